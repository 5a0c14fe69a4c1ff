-- Credits used per UTC day: one accepted click is one credit; the first and last day
-- count only the hours in the range.
-- The range in UTC hours: whole days from the daily table, the days at both ends hour by
-- hour (a range starting at 10:20 counts from 10:00).
SELECT day AS time, sum(c) AS credits
FROM
(
    SELECT day, credits AS c FROM credits_daily
    WHERE day > toDate($__fromTime, 'UTC') AND day < toDate($__toTime, 'UTC')
    UNION ALL
    SELECT toDate(hour) AS day, countMerge(clicks) AS c FROM totals_hourly
    WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime
      AND (toDate(hour) = toDate($__fromTime, 'UTC') OR toDate(hour) = toDate($__toTime, 'UTC'))
    GROUP BY day
)
GROUP BY time
ORDER BY time
