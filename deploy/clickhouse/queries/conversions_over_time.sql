-- Leads and sales per UTC day they occurred on, within the range (to the millisecond).
SELECT toStartOfDay(occurred_at, 'UTC') AS time, countIf(type = 'lead') AS leads, countIf(type = 'sale') AS sales
FROM conversions_attributed
WHERE occurred_at >= $__fromTime AND occurred_at <= $__toTime
GROUP BY time
ORDER BY time
