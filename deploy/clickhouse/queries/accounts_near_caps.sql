-- Accounts at 80 % or more of their daily cap or of the month's included credits, in the
-- UTC day and month of the range's end (over 100 %: over the included credits, billed as
-- overage where the account's overage is on). The daily cap counts clicks (conversions
-- are never refused for it); the month counts what the bill counts: click and conversion
-- credits.
SELECT
    a.account_id AS account_id, a.plan AS plan, a.overage AS overage_on,
    ifNull(d.credits, 0) AS credits_today, p.daily_cap AS daily_cap,
    round(100 * credits_today / p.daily_cap, 1) AS daily_cap_pct,
    ifNull(m.credits, 0) AS credits_month, p.included_credits_month AS included,
    round(100 * credits_month / included, 1) AS included_pct
FROM (SELECT account_id, plan, overage FROM accounts FINAL WHERE is_deleted = 0 AND status = 'active') AS a
INNER JOIN (SELECT plan, daily_cap, included_credits_month FROM plans FINAL) AS p ON p.plan = a.plan
LEFT JOIN
(
    SELECT account_id, sum(credits) AS credits FROM account_credits_hourly
    WHERE hour >= toStartOfDay($__toTime, 'UTC') AND hour <= $__toTime
    GROUP BY account_id
) AS d ON d.account_id = a.account_id
LEFT JOIN
(
    SELECT account_id, sum(credits) AS credits FROM
    (
        SELECT account_id, credits FROM account_credits_hourly
        WHERE hour >= toStartOfMonth($__toTime, 'UTC') AND hour <= $__toTime
        UNION ALL
        SELECT account_id, credits FROM account_conversion_credits_daily
        WHERE day >= toStartOfMonth($__toTime, 'UTC') AND day < toDate($__toTime, 'UTC')
        UNION ALL
        SELECT account_id, count() FROM conversions
        WHERE received_at >= toStartOfDay($__toTime, 'UTC') AND received_at <= $__toTime
        GROUP BY account_id
    )
    GROUP BY account_id
) AS m ON m.account_id = a.account_id
WHERE ifNull(daily_cap_pct, 0) >= 80 OR included_pct >= 80
ORDER BY greatest(ifNull(daily_cap_pct, 0), included_pct) DESC, account_id
LIMIT 50
