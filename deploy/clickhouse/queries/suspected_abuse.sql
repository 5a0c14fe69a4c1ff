-- One ip_hash clicking one code 30 or more times within a UTC hour, in the hours that
-- overlap the range.
SELECT hour, code, hex(ip_hash) AS ip_hash, sum(clicks) AS clicks
FROM ip_code_hourly
WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime
GROUP BY hour, code, ip_hash
HAVING clicks >= 30
ORDER BY clicks DESC, hour, code
LIMIT 100
