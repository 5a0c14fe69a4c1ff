-- The funnel over the range: human clicks (the range in UTC hours, as the click panels
-- count it), then the leads and sales that occurred in the range (to the millisecond),
-- the rates against those clicks, and the share of conversions no click is credited with.
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
    clicks,
    countIf(type = 'lead') AS leads,
    countIf(type = 'sale') AS sales,
    round(countIf(type = 'lead' AND attribution != 'none') / nullIf(clicks, 0), 4) AS lead_rate,
    round(countIf(type = 'sale' AND attribution != 'none') / nullIf(clicks, 0), 4) AS sale_rate,
    round(countIf(attribution = 'none') / nullIf(count(), 0), 4) AS unattributed_share
FROM conversions_attributed
WHERE occurred_at >= $__fromTime AND occurred_at <= $__toTime
