//! The plan catalogue: what each plan includes and limits (deploy/README.md, "The plan catalogue").
//!
//! It is data, not code: `deploy/plans/catalogue.json` holds the docs page's figures and
//! an operator may replace the file. Both binaries load it at start and refuse to start
//! on a file that does not validate, with a message naming the plan and the field.
//! Invariants after [`Catalogue::parse`]: names are unique, lower-case `a-z0-9_-`; every
//! rate limit is at least 1 a minute; included credits at least 1; a daily cap, when
//! present, at least 1; prices and overage rates finite and not negative.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub const CATALOGUE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: String,
    pub price_usd_month: f64,
    pub included_credits_month: u64,
    /// Accepted clicks per UTC day; `None`: no daily cap.
    pub daily_cap: Option<u64>,
    /// Accepted clicks in any rolling 60 s.
    pub rate_limit_per_minute: u32,
    /// `None`: the plan has no overage; past the included credits clicks are refused.
    pub overage_usd_per_1000: Option<f64>,
    /// The overage switch of an account set without `--overage`.
    pub overage_default: bool,
}

impl Plan {
    /// Whether an account on this plan with its switch at `overage_on` is limited to the
    /// included credits per month.
    pub fn monthly_limit(&self, overage_on: bool) -> Option<u64> {
        match (self.overage_usd_per_1000, overage_on) {
            (Some(_), true) => None,
            _ => Some(self.included_credits_month),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    v: u32,
    plans: Vec<Plan>,
}

#[derive(Debug, Clone)]
pub struct Catalogue {
    plans: Vec<Plan>,
    by_name: HashMap<String, usize>,
}

/// `deploy/plans/catalogue.json` as it was when the binary was built: the default when no
/// file is named, so a laptop run needs no path.
pub const BUILTIN_JSON: &[u8] = include_bytes!("../../deploy/plans/catalogue.json");

impl Catalogue {
    /// The file at `path`, or the built-in catalogue.
    pub fn load_or_builtin(path: Option<&Path>) -> Result<Self, String> {
        match path {
            Some(p) => Self::load(p),
            None => Self::parse(BUILTIN_JSON).map_err(|e| format!("built-in plan catalogue: {e}")),
        }
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read(path).map_err(|e| format!("plan catalogue {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("plan catalogue {}: {e}", path.display()))
    }

    pub fn parse(json: &[u8]) -> Result<Self, String> {
        let file: File = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        if file.v != CATALOGUE_VERSION {
            return Err(format!(
                "version {} is not supported (expected {CATALOGUE_VERSION})",
                file.v
            ));
        }
        if file.plans.is_empty() {
            return Err("no plans".into());
        }
        let mut by_name = HashMap::new();
        for (i, plan) in file.plans.iter().enumerate() {
            let name = &plan.name;
            let bad = |field: &str, why: &str| format!("plan {name:?}: {field} {why}");
            if !is_plan_name(name) {
                return Err(format!(
                    "plan #{}: name {name:?} must be 1 to 32 of a-z0-9_-",
                    i + 1
                ));
            }
            if by_name.insert(name.clone(), i).is_some() {
                return Err(bad("name", "appears twice"));
            }
            if plan.rate_limit_per_minute == 0 {
                return Err(bad("rate_limit_per_minute", "must be at least 1"));
            }
            if plan.included_credits_month == 0 {
                return Err(bad("included_credits_month", "must be at least 1"));
            }
            if plan.daily_cap == Some(0) {
                return Err(bad("daily_cap", "must be at least 1 (or null: no cap)"));
            }
            let money = |v: f64| v.is_finite() && v >= 0.0;
            if !money(plan.price_usd_month) {
                return Err(bad("price_usd_month", "must be a number >= 0"));
            }
            if plan.overage_usd_per_1000.is_some_and(|v| !money(v)) {
                return Err(bad(
                    "overage_usd_per_1000",
                    "must be a number >= 0 (or null: no overage)",
                ));
            }
            if plan.overage_default && plan.overage_usd_per_1000.is_none() {
                return Err(bad(
                    "overage_default",
                    "cannot be true without an overage rate",
                ));
            }
        }
        Ok(Self {
            plans: file.plans,
            by_name,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Plan> {
        self.by_name.get(name).map(|&i| &self.plans[i])
    }

    /// The plan's position, a compact handle for per-account state.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn by_index(&self, i: usize) -> &Plan {
        &self.plans[i]
    }

    pub fn plans(&self) -> &[Plan] {
        &self.plans
    }

    /// Plan names, for error messages.
    pub fn names(&self) -> String {
        self.plans
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn is_plan_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &[u8] = BUILTIN_JSON;

    #[test]
    fn the_shipped_catalogue_has_the_docs_page_figures() {
        let c = Catalogue::parse(DEFAULT).expect("valid");
        let row = |n: &str| {
            let p = c.get(n).expect(n);
            (
                p.price_usd_month,
                p.included_credits_month,
                p.daily_cap,
                p.rate_limit_per_minute,
                p.overage_usd_per_1000,
            )
        };
        assert_eq!(row("free"), (0.0, 2_000, Some(500), 5, None));
        assert_eq!(row("starter"), (9.0, 20_000, Some(5_000), 15, Some(0.75)));
        assert_eq!(row("growth"), (29.0, 100_000, Some(25_000), 45, Some(0.45)));
        assert_eq!(row("pro"), (79.0, 400_000, None, 120, Some(0.30)));
        assert_eq!(row("business"), (199.0, 1_200_000, None, 300, Some(0.20)));
        assert_eq!(
            row("enterprise"),
            (499.0, 5_000_000, None, 1_000, Some(0.12))
        );
        // "when enabled" on the docs page: off unless the account turns it on.
        assert!(!c.get("starter").expect("starter").overage_default);
        assert!(c.get("pro").expect("pro").overage_default);
        assert_eq!(
            c.get("free").expect("free").monthly_limit(true),
            Some(2_000)
        );
        assert_eq!(c.get("pro").expect("pro").monthly_limit(true), None);
        assert_eq!(
            c.get("pro").expect("pro").monthly_limit(false),
            Some(400_000)
        );
    }

    #[test]
    fn bad_catalogues_are_refused_with_the_plan_and_field() {
        // A good plan first, so a message that names the first plan instead of the bad
        // one fails.
        let good = r#"{"name":"good","price_usd_month":1,"included_credits_month":10,"daily_cap":null,"rate_limit_per_minute":5,"overage_usd_per_1000":null,"overage_default":false}"#;
        let plan = r#"{"name":"x","price_usd_month":1,"included_credits_month":10,"daily_cap":null,"rate_limit_per_minute":5,"overage_usd_per_1000":null,"overage_default":false}"#;
        let file = |plans: &str| format!(r#"{{"v":1,"plans":[{good},{plans}]}}"#);
        let cases = [
            (
                file(&plan.replace(r#""x""#, r#""X Y""#)),
                r#"plan #2: name "X Y""#,
            ),
            (
                file(&format!("{plan},{plan}")),
                r#"plan "x": name appears twice"#,
            ),
            (
                file(&plan.replace(
                    r#""rate_limit_per_minute":5"#,
                    r#""rate_limit_per_minute":0"#,
                )),
                r#"plan "x": rate_limit_per_minute"#,
            ),
            (
                file(&plan.replace(r#""daily_cap":null"#, r#""daily_cap":0"#)),
                r#"plan "x": daily_cap"#,
            ),
            (
                file(&plan.replace(r#""price_usd_month":1"#, r#""price_usd_month":-1"#)),
                r#"plan "x": price_usd_month"#,
            ),
            (
                file(&plan.replace(r#""overage_default":false"#, r#""overage_default":true"#)),
                r#"plan "x": overage_default"#,
            ),
        ];
        for (json, needle) in cases {
            let e = Catalogue::parse(json.as_bytes()).expect_err(&json);
            assert!(
                e.starts_with(needle),
                "{json}: {e:?} should start with {needle:?}"
            );
        }
        // Refused before any plan is looked at: the reason alone.
        let cases = [
            (
                file(&plan.replace(r#""name":"x""#, r#""name":"x","extra":1"#)),
                "unknown field",
            ),
            (r#"{"v":1,"plans":[]}"#.to_owned(), "no plans"),
            (r#"{"v":2,"plans":[]}"#.to_owned(), "version 2"),
            ("not json".to_owned(), "expected"),
        ];
        for (json, needle) in cases {
            let e = Catalogue::parse(json.as_bytes()).expect_err(&json);
            assert!(e.contains(needle), "{json}: {e}");
        }
    }
}
