-- How the conversions that occurred in the range are attributed, per type: to their own
-- click, inherited from the customer's earlier conversion, or to nothing; with the time
-- from click to conversion (seconds) of the attributed ones.
SELECT
    type,
    attribution,
    count() AS conversions,
    round(count() / sum(count()) OVER (PARTITION BY type), 4) AS share,
    if(attribution = 'none', NULL, quantileExact(0.5)(seconds_to_convert)) AS median_seconds_to_convert,
    if(attribution = 'none', NULL, max(seconds_to_convert)) AS max_seconds_to_convert
FROM conversions_attributed
WHERE occurred_at >= $__fromTime AND occurred_at <= $__toTime
GROUP BY type, attribution
ORDER BY type, attribution
