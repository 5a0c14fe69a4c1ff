-- Human clicks, human unique visitors and bot clicks in the range.
-- The range in UTC hours: whole days from the daily table, the days at both ends hour by
-- hour (a range starting at 10:20 counts from 10:00).
SELECT
    countMergeIf(clicks, is_bot = 0) AS human_clicks,
    uniqHLL12MergeIf(visitors, is_bot = 0) AS human_visitors,
    countMergeIf(clicks, is_bot = 1) AS bot_clicks
FROM
(
    SELECT is_bot, clicks, visitors FROM totals_daily
    WHERE day > toDate($__fromTime, 'UTC') AND day < toDate($__toTime, 'UTC')
    UNION ALL
    SELECT is_bot, clicks, visitors FROM totals_hourly
    WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime
      AND (toDate(hour) = toDate($__fromTime, 'UTC') OR toDate(hour) = toDate($__toTime, 'UTC'))
)
