-- Human clicks and unique visitors per hour for the 10 codes with the most human clicks in the range.
SELECT hour AS time, code, countMerge(clicks) AS clicks, uniqHLL12Merge(visitors) AS visitors
FROM clicks_hourly
WHERE $__timeFilter(hour) AND is_bot = 0
  AND code IN
  (
      SELECT code FROM code_clicks_daily
      WHERE day >= toDate($__fromTime) AND day <= toDate($__toTime) AND is_bot = 0
      GROUP BY code ORDER BY sum(clicks) DESC, code LIMIT 10
  )
GROUP BY time, code
ORDER BY time, code
