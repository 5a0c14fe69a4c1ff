-- Per landing path: human clicks in the range (UTC hours, as the click panels), the leads
-- and sales that occurred in the range attributed to those clicks, rates and revenue per
-- currency (minor units) and per click, and the median time from click to conversion.
WITH
    clicks AS
    (
        SELECT landing_path, sum(c) AS clicks FROM
        (
            SELECT landing_path, countMerge(clicks) AS c FROM clicks_by_path_daily
            WHERE day > toDate($__fromTime, 'UTC') AND day < toDate($__toTime, 'UTC') AND is_bot = 0
            GROUP BY landing_path
            UNION ALL
            SELECT landing_path, countMerge(clicks) AS c FROM clicks_by_path_hourly
            WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime
              AND (toDate(hour) = toDate($__fromTime, 'UTC') OR toDate(hour) = toDate($__toTime, 'UTC')) AND is_bot = 0
            GROUP BY landing_path
        )
        GROUP BY landing_path
    ),
    conv AS
    (
        SELECT landing_path, countIf(type = 'lead') AS leads, countIf(type = 'sale') AS sales,
               sumMapIf([currency], [amount], type = 'sale') AS revenue,
               quantileExactIf(0.5)(seconds_to_convert, attribution != 'none') AS median_seconds
        FROM conversions_attributed
        WHERE occurred_at >= $__fromTime AND occurred_at <= $__toTime AND attribution != 'none'
        GROUP BY landing_path
    )
SELECT
    landing_path,
    clicks.clicks AS clicks,
    conv.leads AS leads,
    conv.sales AS sales,
    round(conv.leads / nullIf(clicks.clicks, 0), 4) AS lead_rate,
    round(conv.sales / nullIf(clicks.clicks, 0), 4) AS sale_rate,
    arrayStringConcat(arrayMap((c, a) -> concat(c, ' ', toString(a)), conv.revenue.1, conv.revenue.2), ', ') AS revenue,
    arrayStringConcat(arrayMap((c, a) -> concat(c, ' ', if(clicks.clicks = 0, '-', toString(round(a / clicks.clicks, 2)))), conv.revenue.1, conv.revenue.2), ', ') AS revenue_per_click,
    conv.median_seconds AS median_seconds_to_convert
FROM clicks
FULL OUTER JOIN conv USING (landing_path)
ORDER BY sales DESC, leads DESC, clicks DESC, landing_path
LIMIT 100
