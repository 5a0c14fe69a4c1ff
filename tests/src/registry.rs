//! The referral-program registry topics of one test, and the operator commands.

use crate::*;

/// The registry topics of one test (named after its click topic).
#[derive(Clone, Debug)]
pub struct RegistryTopics {
    pub accounts: String,
    pub codes: String,
    pub keys: String,
    pub refusals: String,
    /// Not the registry, but named and created with it: every scope has its own.
    pub conversions: String,
}

impl RegistryTopics {
    pub fn for_topic(topic: &str) -> Self {
        Self {
            accounts: format!("{topic}_accounts"),
            codes: format!("{topic}_codes"),
            keys: format!("{topic}_keys"),
            refusals: format!("{topic}_refusals"),
            conversions: format!("{topic}_conversions"),
        }
    }

    pub async fn create(&self, brokers: &str) {
        create_topic(brokers, &self.accounts, 1).await;
        create_topic(brokers, &self.codes, 2).await;
        create_topic(brokers, &self.keys, 1).await;
        create_topic(brokers, &self.refusals, 1).await;
        create_topic(brokers, &self.conversions, 2).await;
    }

    /// The settings an operator command needs to write these topics.
    fn command_env(
        &self,
        cmd: &mut tokio::process::Command,
        brokers: &str,
        click_topic: &str,
        plans: &std::path::Path,
    ) {
        cmd.env("CONSUMER_KAFKA_BROKERS", brokers)
            .env("CONSUMER_KAFKA_TOPIC", click_topic)
            .env("CONSUMER_ACCOUNTS_TOPIC", &self.accounts)
            .env("CONSUMER_CODES_TOPIC", &self.codes)
            .env("CONSUMER_KEYS_TOPIC", &self.keys)
            .env("CONSUMER_REFUSALS_TOPIC", &self.refusals)
            .env("CONSUMER_CONVERSIONS_TOPIC", &self.conversions)
            .env("CONSUMER_PLANS_FILE", plans)
            .env("LOG_LEVEL", "warn");
    }

    /// Runs a `consumer` operator command (accounts, codes) against these topics; its exit
    /// code and everything it printed.
    pub async fn consumer_command(
        &self,
        brokers: &str,
        click_topic: &str,
        args: &[&str],
        plans: &std::path::Path,
    ) -> (i32, String) {
        let mut cmd = tokio::process::Command::new(bin("consumer"));
        cmd.args(args);
        self.command_env(&mut cmd, brokers, click_topic, plans);
        let out = cmd.output().await.expect("consumer command");
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// [`Self::consumer_command`] with its output on a terminal: `script` runs it under a
    /// pseudo-terminal and returns what the terminal showed.
    pub async fn consumer_command_on_terminal(
        &self,
        brokers: &str,
        click_topic: &str,
        args: &[&str],
        plans: &std::path::Path,
    ) -> (i32, String) {
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let line: Vec<String> = std::iter::once(bin("consumer").display().to_string())
            .chain(args.iter().map(|a| (*a).to_owned()))
            .map(|a| quote(&a))
            .collect();
        let mut cmd = tokio::process::Command::new("script");
        cmd.args(["-qec", &line.join(" "), "/dev/null"]);
        self.command_env(&mut cmd, brokers, click_topic, plans);
        let out = cmd
            .output()
            .await
            .expect("script (util-linux) runs the command on a pseudo-terminal");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Writes an account record, as `consumer accounts set` does.
    pub async fn set_account(
        &self,
        brokers: &str,
        id: &str,
        plan: &str,
        overage: bool,
        active: bool,
    ) {
        use shared::registry::{AccountRecord, AccountStatus};
        let status = if active {
            AccountStatus::Active
        } else {
            AccountStatus::Suspended
        };
        let value = AccountRecord::new(plan, overage, status).encode();
        produce_raw(brokers, &self.accounts, &[(Some(id), &value)]).await;
    }

    /// Writes code records (active, or disabled), as `consumer codes add|disable` do.
    pub async fn set_codes(&self, brokers: &str, account: &str, codes: &[&str], active: bool) {
        use shared::registry::{CodeRecord, CodeStatus};
        let status = if active {
            CodeStatus::Active
        } else {
            CodeStatus::Disabled
        };
        let value = CodeRecord::new(account, status).encode();
        let messages: Vec<(Option<&str>, &[u8])> =
            codes.iter().map(|c| (Some(*c), value.as_slice())).collect();
        produce_raw(brokers, &self.codes, &messages).await;
    }
}
