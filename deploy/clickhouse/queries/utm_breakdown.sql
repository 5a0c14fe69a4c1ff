-- Human clicks and unique visitors by utm source, medium and campaign.
-- The range in UTC hours: whole days from the daily table, the days at both ends hour by
-- hour (a range starting at 10:20 counts from 10:00).
SELECT utm_source, utm_medium, utm_campaign, sum(c) AS clicks, uniqHLL12Merge(v) AS visitors
FROM
(
    SELECT utm_source, utm_medium, utm_campaign, countMerge(clicks) AS c, uniqHLL12MergeState(visitors) AS v FROM utm_daily
    WHERE day > toDate($__fromTime, 'UTC') AND day < toDate($__toTime, 'UTC') AND is_bot = 0
    GROUP BY utm_source, utm_medium, utm_campaign
    UNION ALL
    SELECT utm_source, utm_medium, utm_campaign, countMerge(clicks) AS c, uniqHLL12MergeState(visitors) AS v FROM utm_hourly
    WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime
      AND (toDate(hour) = toDate($__fromTime, 'UTC') OR toDate(hour) = toDate($__toTime, 'UTC')) AND is_bot = 0
    GROUP BY utm_source, utm_medium, utm_campaign
)
GROUP BY utm_source, utm_medium, utm_campaign
ORDER BY clicks DESC, utm_source, utm_medium, utm_campaign
LIMIT 100
