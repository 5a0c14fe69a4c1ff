-- Overage per account and billing month (UTC), for the months that overlap the range,
-- priced from the plan catalogue under the account's current plan and overage switch.
SELECT month, account_id, plan, credits, included_credits, overage_credits, overage_usd
FROM account_billing_monthly
WHERE month >= toStartOfMonth($__fromTime, 'UTC') AND month <= toDate($__toTime, 'UTC') AND overage_credits > 0
ORDER BY month, overage_usd DESC, account_id
LIMIT 100
