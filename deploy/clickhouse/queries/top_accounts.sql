-- The 20 accounts with the most credits in the range (UTC hours that overlap it), with
-- their current plan and the clicks refused for them by a plan limit.
SELECT c.account_id AS account_id, a.plan AS plan, c.credits AS credits, ifNull(r.refused, 0) AS refused
FROM
(
    SELECT account_id, sum(credits) AS credits
    FROM account_credits_hourly
    WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime AND account_id != ''
    GROUP BY account_id
    ORDER BY credits DESC, account_id
    LIMIT 20
) AS c
LEFT JOIN (SELECT account_id, plan FROM accounts FINAL WHERE is_deleted = 0) AS a ON a.account_id = c.account_id
LEFT JOIN
(
    SELECT account_id, sum(refusals) AS refused
    FROM account_refusals FINAL
    WHERE window_start >= $__fromTime AND window_start <= $__toTime AND account_id != ''
    GROUP BY account_id
) AS r ON r.account_id = c.account_id
ORDER BY credits DESC, account_id
