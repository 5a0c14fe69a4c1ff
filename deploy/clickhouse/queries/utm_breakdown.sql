-- Human clicks and unique visitors by utm source, medium and campaign.
SELECT utm_source, utm_medium, utm_campaign, countMerge(clicks) AS clicks, uniqHLL12Merge(visitors) AS visitors
FROM utm_daily
WHERE day >= toDate($__fromTime) AND day <= toDate($__toTime) AND is_bot = 0
GROUP BY utm_source, utm_medium, utm_campaign
ORDER BY clicks DESC, utm_source, utm_medium, utm_campaign
LIMIT 100
