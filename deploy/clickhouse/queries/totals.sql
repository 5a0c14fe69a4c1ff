-- Human clicks, human unique visitors and bot clicks in the range.
SELECT
    countMergeIf(clicks, is_bot = 0) AS human_clicks,
    uniqHLL12MergeIf(visitors, is_bot = 0) AS human_visitors,
    countMergeIf(clicks, is_bot = 1) AS bot_clicks
FROM totals_daily
WHERE day >= toDate($__fromTime) AND day <= toDate($__toTime)
