-- Clicks refused in the range, by limit (ip, plan_rate, daily_cap, monthly_credits), and
-- how many accounts each limit refused.
SELECT limit_name, sum(refusals) AS refused, uniqExactIf(account_id, account_id != '') AS accounts
FROM account_refusals FINAL
WHERE window_start >= $__fromTime AND window_start <= $__toTime
GROUP BY limit_name
ORDER BY refused DESC, limit_name
