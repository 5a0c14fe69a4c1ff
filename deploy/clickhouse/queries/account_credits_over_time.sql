-- Credits per hour (UTC) of the 10 accounts with the most credits in the range; the hours
-- that overlap the range.
SELECT hour AS time, account_id, sum(credits) AS credits
FROM account_credits_hourly
WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime AND account_id != ''
  AND account_id IN
  (
      SELECT account_id FROM account_credits_hourly
      WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime AND account_id != ''
      GROUP BY account_id ORDER BY sum(credits) DESC, account_id LIMIT 10
  )
GROUP BY time, account_id
ORDER BY time, account_id
