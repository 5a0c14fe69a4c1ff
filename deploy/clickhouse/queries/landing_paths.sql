-- Human clicks and unique visitors by landing path.
SELECT landing_path, countMerge(clicks) AS clicks, uniqHLL12Merge(visitors) AS visitors
FROM clicks_by_path_daily
WHERE day >= toDate($__fromTime) AND day <= toDate($__toTime) AND is_bot = 0
GROUP BY landing_path
ORDER BY clicks DESC, landing_path
LIMIT 50
