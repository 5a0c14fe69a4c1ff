-- Credits used per day: one accepted click is one credit.
SELECT day AS time, sum(credits) AS credits
FROM credits_daily
WHERE day >= toDate($__fromTime) AND day <= toDate($__toTime)
GROUP BY time
ORDER BY time
