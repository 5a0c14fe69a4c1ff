-- Human clicks and unique visitors per code per hour.
SELECT hour AS time, code, countMerge(clicks) AS clicks, uniqMerge(visitors) AS visitors
FROM clicks_hourly
WHERE $__timeFilter(hour) AND is_bot = 0
GROUP BY time, code
ORDER BY time, code
