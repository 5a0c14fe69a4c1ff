-- Share of clicks classified as bots, per UTC day (the first and last day: the hours in
-- the range).
-- The range in UTC hours: whole days from the daily table, the days at both ends hour by
-- hour (a range starting at 10:20 counts from 10:00).
SELECT day AS time, sum(c) AS clicks, sumIf(c, is_bot = 1) AS bot_clicks, bot_clicks / clicks AS bot_share
FROM
(
    SELECT day, is_bot, countMerge(clicks) AS c FROM totals_daily
    WHERE day > toDate($__fromTime, 'UTC') AND day < toDate($__toTime, 'UTC')
    GROUP BY day, is_bot
    UNION ALL
    SELECT toDate(hour) AS day, is_bot, countMerge(clicks) AS c FROM totals_hourly
    WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime
      AND (toDate(hour) = toDate($__fromTime, 'UTC') OR toDate(hour) = toDate($__toTime, 'UTC'))
    GROUP BY day, is_bot
)
GROUP BY time
ORDER BY time
