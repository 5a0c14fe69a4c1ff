-- Per utm source / medium / campaign: human clicks in the range (UTC hours, as the click
-- panels), the leads and sales that occurred in the range attributed to those clicks,
-- rates, revenue per currency (minor units) and per click, and the median time from click
-- to conversion.
WITH
    clicks AS
    (
        SELECT utm_source, utm_medium, utm_campaign, sum(c) AS clicks FROM
        (
            SELECT utm_source, utm_medium, utm_campaign, countMerge(clicks) AS c FROM utm_daily
            WHERE day > toDate($__fromTime, 'UTC') AND day < toDate($__toTime, 'UTC') AND is_bot = 0
            GROUP BY utm_source, utm_medium, utm_campaign
            UNION ALL
            SELECT utm_source, utm_medium, utm_campaign, countMerge(clicks) AS c FROM utm_hourly
            WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime
              AND (toDate(hour) = toDate($__fromTime, 'UTC') OR toDate(hour) = toDate($__toTime, 'UTC')) AND is_bot = 0
            GROUP BY utm_source, utm_medium, utm_campaign
        )
        GROUP BY utm_source, utm_medium, utm_campaign
    ),
    conv AS
    (
        SELECT utm_source, utm_medium, utm_campaign,
               countIf(type = 'lead') AS leads, countIf(type = 'sale') AS sales,
               sumMapIf([currency], [amount], type = 'sale') AS revenue,
               quantileExactIf(0.5)(seconds_to_convert, attribution != 'none') AS median_seconds
        FROM conversions_attributed
        WHERE occurred_at >= $__fromTime AND occurred_at <= $__toTime AND attribution != 'none'
        GROUP BY utm_source, utm_medium, utm_campaign
    )
SELECT
    utm_source, utm_medium, utm_campaign,
    clicks.clicks AS clicks,
    conv.leads AS leads,
    conv.sales AS sales,
    round(conv.leads / nullIf(clicks.clicks, 0), 4) AS lead_rate,
    round(conv.sales / nullIf(clicks.clicks, 0), 4) AS sale_rate,
    arrayStringConcat(arrayMap((c, a) -> concat(c, ' ', toString(a)), conv.revenue.1, conv.revenue.2), ', ') AS revenue,
    arrayStringConcat(arrayMap((c, a) -> concat(c, ' ', if(clicks.clicks = 0, '-', toString(round(a / clicks.clicks, 2)))), conv.revenue.1, conv.revenue.2), ', ') AS revenue_per_click,
    conv.median_seconds AS median_seconds_to_convert
FROM clicks
FULL OUTER JOIN conv USING (utm_source, utm_medium, utm_campaign)
ORDER BY sales DESC, leads DESC, clicks DESC, utm_source, utm_medium, utm_campaign
LIMIT 100
