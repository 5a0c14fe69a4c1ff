-- Human clicks and unique visitors per UTC hour for the 10 codes with the most human
-- clicks in the range (ranked over the range, days and edge hours alike).
SELECT hour AS time, code, countMerge(clicks) AS clicks, uniqHLL12Merge(visitors) AS visitors
FROM clicks_hourly
WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime AND is_bot = 0
  AND code IN
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
      GROUP BY code ORDER BY sum(c) DESC, code LIMIT 10
  )
GROUP BY time, code
ORDER BY time, code
