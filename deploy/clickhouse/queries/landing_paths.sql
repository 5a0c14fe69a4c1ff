-- Human clicks and unique visitors by landing path.
-- The range in UTC hours: whole days from the daily table, the days at both ends hour by
-- hour (a range starting at 10:20 counts from 10:00).
SELECT landing_path, sum(c) AS clicks, uniqHLL12Merge(v) AS visitors
FROM
(
    SELECT landing_path, countMerge(clicks) AS c, uniqHLL12MergeState(visitors) AS v FROM clicks_by_path_daily
    WHERE day > toDate($__fromTime, 'UTC') AND day < toDate($__toTime, 'UTC') AND is_bot = 0
    GROUP BY landing_path
    UNION ALL
    SELECT landing_path, countMerge(clicks) AS c, uniqHLL12MergeState(visitors) AS v FROM clicks_by_path_hourly
    WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime
      AND (toDate(hour) = toDate($__fromTime, 'UTC') OR toDate(hour) = toDate($__toTime, 'UTC')) AND is_bot = 0
    GROUP BY landing_path
)
GROUP BY landing_path
ORDER BY clicks DESC, landing_path
LIMIT 50
