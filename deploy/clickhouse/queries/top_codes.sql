-- The 20 codes with the most human clicks in the range, with unique visitors.
SELECT code, countMerge(clicks) AS clicks, uniqHLL12Merge(visitors) AS visitors
FROM clicks_daily
WHERE day >= toDate($__fromTime) AND day <= toDate($__toTime) AND is_bot = 0
  AND code IN
  (
      SELECT code FROM code_clicks_daily
      WHERE day >= toDate($__fromTime) AND day <= toDate($__toTime) AND is_bot = 0
      GROUP BY code ORDER BY sum(clicks) DESC, code LIMIT 20
  )
GROUP BY code
ORDER BY clicks DESC, code
