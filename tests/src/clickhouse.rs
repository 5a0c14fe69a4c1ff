//! ClickHouse over HTTP: queries and row counts that fail loudly.

pub struct ClickHouse {
    url: String,
    http: reqwest::Client,
}

impl ClickHouse {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn try_query(&self, sql: &str) -> Result<String, String> {
        let r = self
            .http
            .post(&self.url)
            .query(&[("output_format_json_quote_64bit_integers", "0")])
            .body(sql.to_owned())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let ok = r.status().is_success();
        let text = r.text().await.map_err(|e| e.to_string())?;
        if ok {
            Ok(text)
        } else {
            Err(text)
        }
    }

    pub async fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .await
            .unwrap_or_else(|e| panic!("query failed: {sql}\n{e}"))
    }

    /// Rows of `sql` as JSON objects (FORMAT JSONEachRow appended).
    pub async fn rows(&self, sql: &str) -> Vec<serde_json::Value> {
        self.query(&format!("{sql} FORMAT JSONEachRow"))
            .await
            .lines()
            .map(|l| serde_json::from_str(l).expect("json row"))
            .collect()
    }

    pub async fn scalar(&self, sql: &str) -> u64 {
        self.query(sql)
            .await
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("not a number from {sql}"))
    }

    /// `count()` of a table. Any error (the table or database missing included) fails the
    /// test: a check that expects zero rows must not pass because the table is gone.
    pub async fn count(&self, table: &str) -> u64 {
        self.scalar(&format!("SELECT count() FROM {table} FORMAT TSV"))
            .await
    }

    /// `(count(), uniqExact(click_id))` of the clicks table, without FINAL. Any error fails
    /// the test.
    pub async fn counts(&self, table: &str) -> (u64, u64) {
        let sql = format!("SELECT count(), uniqExact(click_id) FROM {table} FORMAT TSV");
        parse_counts(&self.query(&sql).await, &sql)
    }

    /// [`Self::counts`], but `(0, 0)` while the table or its database does not exist yet
    /// (a consumer that has not migrated yet); every other error fails the test. For
    /// polling only.
    pub async fn counts_if_exists(&self, table: &str) -> (u64, u64) {
        let sql = format!("SELECT count(), uniqExact(click_id) FROM {table} FORMAT TSV");
        match self.try_query(&sql).await {
            Ok(text) => parse_counts(&text, &sql),
            Err(e) if is_missing_table(&e) => (0, 0),
            Err(e) => panic!("query failed: {sql}\n{e}"),
        }
    }
}

/// ClickHouse's answer for a table or database that does not exist.
fn is_missing_table(error: &str) -> bool {
    [
        "UNKNOWN_TABLE",
        "UNKNOWN_DATABASE",
        "Code: 60.",
        "Code: 81.",
    ]
    .iter()
    .any(|m| error.contains(m))
}

fn parse_counts(text: &str, sql: &str) -> (u64, u64) {
    let values: Vec<u64> = text
        .split_whitespace()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("not a number {v:?} from {sql}"))
        })
        .collect();
    match values[..] {
        [count, uniq] => (count, uniq),
        _ => panic!("expected two numbers from {sql}, got {text:?}"),
    }
}
