//! UTC days and months from Unix milliseconds, without a date crate: the limiter's day and
//! month counters and the `Retry-After` of day and month limits need only these.

pub const DAY_MS: u64 = 86_400_000;

/// Days since 1970-01-01 (UTC).
pub fn day(now_ms: u64) -> u32 {
    (now_ms / DAY_MS) as u32
}

/// The month as `YYYYMM` (UTC).
pub fn month(now_ms: u64) -> u32 {
    let (y, m, _) = civil_from_days(i64::from(day(now_ms)));
    (y as u32) * 100 + m
}

/// Milliseconds from `now_ms` to the next UTC midnight.
pub fn ms_to_next_day(now_ms: u64) -> u64 {
    DAY_MS - now_ms % DAY_MS
}

/// Milliseconds from `now_ms` to the first instant of the next UTC month.
pub fn ms_to_next_month(now_ms: u64) -> u64 {
    let (y, m, _) = civil_from_days(i64::from(day(now_ms)));
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let next = days_from_civil(ny, nm, 1) as u64 * DAY_MS;
    next.saturating_sub(now_ms)
}

/// Seconds in the month that contains `now_ms` (the window of the monthly policy).
pub fn month_secs(now_ms: u64) -> u64 {
    let (y, m, _) = civil_from_days(i64::from(day(now_ms)));
    let start = days_from_civil(y, m, 1);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (days_from_civil(ny, nm, 1) - start) as u64 * 86_400
}

/// Howard Hinnant's days-to-civil: (year, month 1–12, day 1–31) of a day number since
/// the Unix epoch.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Howard Hinnant's civil-to-days.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEC_2_2026_NOON: u64 = 1_796_212_800_000;

    #[test]
    fn days_and_months_in_utc() {
        assert_eq!(day(0), 0);
        assert_eq!(month(0), 197_001);
        assert_eq!(month(DEC_2_2026_NOON), 202_612);
        assert_eq!(ms_to_next_day(DEC_2_2026_NOON), DAY_MS / 2);
        // December has 31 days: from the 2nd at noon, 29.5 days to January 1st.
        assert_eq!(ms_to_next_month(DEC_2_2026_NOON), 29 * DAY_MS + DAY_MS / 2);
        assert_eq!(month_secs(DEC_2_2026_NOON), 31 * 86_400);
        // February of a leap year.
        let feb_2028 = days_from_civil(2028, 2, 10) as u64 * DAY_MS;
        assert_eq!(month(feb_2028), 202_802);
        assert_eq!(month_secs(feb_2028), 29 * 86_400);
        for z in [-1000, 0, 1, 59, 60, 20_000, 20_789, 100_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }
}
