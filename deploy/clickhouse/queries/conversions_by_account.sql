-- Per account: clicks charged in the range (every accepted click, UTC hours that overlap
-- it), leads and sales that occurred in the range, rates, revenue per currency (minor
-- units) and per charged click, the median time from click to conversion, and the share
-- of its conversions no click is credited with.
WITH
    clicks AS
    (
        SELECT account_id, sum(credits) AS clicks FROM account_credits_hourly
        WHERE hour >= toStartOfHour($__fromTime, 'UTC') AND hour <= $__toTime AND account_id != ''
        GROUP BY account_id
    ),
    conv AS
    (
        SELECT account_id, countIf(type = 'lead') AS leads, countIf(type = 'sale') AS sales,
               countIf(type = 'lead' AND attribution != 'none') AS attributed_leads,
               countIf(type = 'sale' AND attribution != 'none') AS attributed_sales,
               sumMapIf([currency], [amount], type = 'sale') AS revenue,
               quantileExactIf(0.5)(seconds_to_convert, attribution != 'none') AS median_seconds,
               countIf(attribution = 'none') / count() AS unattributed
        FROM conversions_attributed
        WHERE occurred_at >= $__fromTime AND occurred_at <= $__toTime
        GROUP BY account_id
    )
SELECT
    account_id,
    clicks.clicks AS clicks,
    conv.leads AS leads,
    conv.sales AS sales,
    round(conv.attributed_leads / nullIf(clicks.clicks, 0), 4) AS lead_rate,
    round(conv.attributed_sales / nullIf(clicks.clicks, 0), 4) AS sale_rate,
    arrayStringConcat(arrayMap((c, a) -> concat(c, ' ', toString(a)), conv.revenue.1, conv.revenue.2), ', ') AS revenue,
    arrayStringConcat(arrayMap((c, a) -> concat(c, ' ', if(clicks.clicks = 0, '-', toString(round(a / clicks.clicks, 2)))), conv.revenue.1, conv.revenue.2), ', ') AS revenue_per_click,
    conv.median_seconds AS median_seconds_to_convert,
    round(conv.unattributed, 4) AS unattributed_share
FROM clicks
FULL OUTER JOIN conv USING (account_id)
ORDER BY sales DESC, leads DESC, clicks DESC, account_id
LIMIT 100
