-- Revenue per currency (minor units: cents for EUR, yen for JPY) of the sales that
-- occurred in the range, the part attributed to a click, and revenue per human click in
-- the range (attributed revenue / clicks, minor units).
WITH
    (
        SELECT countMergeIf(clicks, is_bot = 0) FROM
        (
            SELECT is_bot, clicks FROM totals_daily
            WHERE day > toDate($__fromTime, 'UTC') AND day < toDate($__toTime, 'UTC')
            UNION ALL
            SELECT is_bot, clicks FROM totals_hourly
            WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime
              AND (toDate(hour) = toDate($__fromTime, 'UTC') OR toDate(hour) = toDate($__toTime, 'UTC'))
        )
    ) AS clicks
SELECT
    currency,
    count() AS sales,
    sum(amount) AS revenue,
    sumIf(amount, attribution != 'none') AS attributed_revenue,
    round(attributed_revenue / nullIf(clicks, 0), 2) AS revenue_per_click
FROM conversions_attributed
WHERE type = 'sale' AND occurred_at >= $__fromTime AND occurred_at <= $__toTime
GROUP BY currency
ORDER BY revenue DESC, currency
