-- Share of clicks classified as bots, per day.
SELECT day AS time, sum(c) AS clicks, sumIf(c, is_bot = 1) AS bot_clicks, bot_clicks / clicks AS bot_share
FROM
(
    SELECT day, is_bot, countMerge(clicks) AS c
    FROM totals_daily
    WHERE day >= toDate($__fromTime) AND day <= toDate($__toTime)
    GROUP BY day, is_bot
)
GROUP BY time
ORDER BY time
