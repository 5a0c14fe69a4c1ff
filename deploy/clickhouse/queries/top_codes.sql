-- The 20 codes with the most human clicks in the range, with unique visitors.
-- The range in UTC hours: whole days from the daily table, the days at both ends hour by
-- hour (a range starting at 10:20 counts from 10:00).
WITH top AS
(
    SELECT code FROM
    (
        SELECT code, sum(clicks) AS c FROM code_clicks_daily
        WHERE day > toDate($__fromTime, 'UTC') AND day < toDate($__toTime, 'UTC') AND is_bot = 0
        GROUP BY code
        UNION ALL
        SELECT code, countMerge(clicks) AS c FROM clicks_hourly
        WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime
          AND (toDate(hour) = toDate($__fromTime, 'UTC') OR toDate(hour) = toDate($__toTime, 'UTC')) AND is_bot = 0
        GROUP BY code
    )
    GROUP BY code ORDER BY sum(c) DESC, code LIMIT 20
)
SELECT code, sum(c) AS clicks, uniqHLL12Merge(v) AS visitors
FROM
(
    SELECT code, countMerge(clicks) AS c, uniqHLL12MergeState(visitors) AS v FROM clicks_daily
    WHERE day > toDate($__fromTime, 'UTC') AND day < toDate($__toTime, 'UTC') AND is_bot = 0 AND code IN top
    GROUP BY code
    UNION ALL
    SELECT code, countMerge(clicks) AS c, uniqHLL12MergeState(visitors) AS v FROM clicks_hourly
    WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime
      AND (toDate(hour) = toDate($__fromTime, 'UTC') OR toDate(hour) = toDate($__toTime, 'UTC')) AND is_bot = 0 AND code IN top
    GROUP BY code
)
GROUP BY code
ORDER BY clicks DESC, code
