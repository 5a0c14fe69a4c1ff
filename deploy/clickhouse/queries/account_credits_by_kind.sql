-- Credits per account and UTC day of the range: clicks and conversions side by side (a
-- conversion costs one credit, like a click; both count toward the month's bill).
SELECT day, account_id, click_credits, conversion_credits, credits
FROM account_all_credits_daily
WHERE day >= toDate($__fromTime, 'UTC') AND day <= toDate($__toTime, 'UTC') AND account_id != ''
ORDER BY day, credits DESC, account_id
LIMIT 200
