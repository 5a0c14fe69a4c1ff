//! Bot classification of the User-Agent, made at ingest (the raw User-Agent never leaves
//! ingest, so this is the only place it can be made). Uses the `isbot` crate's curated
//! pattern list rather than hand-written regexes. An empty User-Agent counts as a bot:
//! every mainstream browser sends one.

pub struct BotDetector(isbot::Bots);

impl BotDetector {
    pub fn new() -> Self {
        Self(isbot::Bots::default())
    }

    pub fn is_bot(&self, user_agent: &str) -> bool {
        user_agent.trim().is_empty() || self.0.is_bot(user_agent)
    }
}

impl Default for BotDetector {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_common_agents() {
        let d = BotDetector::new();
        assert!(d.is_bot("Googlebot/2.1 (+http://www.google.com/bot.html)"));
        assert!(d.is_bot("curl/8.5.0"));
        assert!(d.is_bot(""));
        assert!(!d.is_bot("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"));
        assert!(!d.is_bot("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"));
    }
}
