//! Sets of ids in SQL. The consumer's lookups send thousands of ids per query (a plan's
//! click ids, conversion keys); as a literal list the server spends most of the query
//! parsing them, so they go as one string literal read as TSV.

use clickhouse::Client;

/// A query whose `{ids}` is the set of `ids` ([`id_set`]), or, when an id cannot be
/// written so, a bound list; binds for any `?` after `{ids}` follow.
pub fn query_in(client: &Client, template: &str, ids: &[&str]) -> clickhouse::query::Query {
    match id_set(ids) {
        Some(set) => client.query(&template.replace("{ids}", &set)),
        None => client.query(&template.replace("{ids}", "?")).bind(ids),
    }
}

/// `(SELECT id FROM format(TSV, 'id String', $$…$$))`: one string literal, which the server
/// parses several times faster than a literal list of thousands (tests/README.md). `None`
/// when an id holds a character that could end that literal, a TSV field, or be taken for
/// a bind (none of a valid click id, conversion key or account id does).
pub fn id_set(ids: &[&str]) -> Option<String> {
    if ids
        .iter()
        .any(|id| id.contains(['$', '\t', '\n', '\r', '\\', '?']))
    {
        return None;
    }
    let mut set = String::with_capacity(64 + ids.iter().map(|i| i.len() + 1).sum::<usize>());
    set.push_str("(SELECT id FROM format(TSV, 'id String', $$");
    for id in ids {
        set.push_str(id);
        set.push('\n');
    }
    set.push_str("$$))");
    Some(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_go_as_one_literal_and_anything_else_is_bound() {
        assert_eq!(
            id_set(&["refclk_a-1", "acct/sale/inv:2024.7@x+y"]).as_deref(),
            Some("(SELECT id FROM format(TSV, 'id String', $$refclk_a-1\nacct/sale/inv:2024.7@x+y\n$$))")
        );
        for bad in ["a$$b", "a\tb", "a\nb", "a\\b", "a?b"] {
            assert_eq!(id_set(&["ok", bad]), None, "{bad:?}");
        }
    }
}
