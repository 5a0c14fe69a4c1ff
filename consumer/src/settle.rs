//! What happens after a plan's rows are stored, for both streams: the attribution those
//! rows can change is computed anew ([`crate::attribution`]). A plan is done (its offsets
//! committed) only when its rows are stored *and* settled.
//!
//! # Invariants
//! * **Settled with every replay.** The rows settled are all of the plan's rows stored at
//!   their own position, whether this attempt sent them or an earlier one did (found by
//!   the insert's deduplication token, the remembered ids, or the stored-rows check). So
//!   a crash, a rebalance or a failed statement between the store and the settle is
//!   mended by whoever replays the plan: the settle step is idempotent and runs again.
//! * **Whichever is stored last finds the other.** A click and a conversion naming it each
//!   look for the other only after they are stored: a conversion's computation reads its
//!   click through `clicks_by_id`, and a stored click looks up the conversions naming it
//!   in `conversions_by_click` (both ordered by click id, filled by views as part of the
//!   insert). Whichever of the two was stored second sees the first.
//! * **Cost follows the batch.** Each step reads indexes ordered by the key it looks up;
//!   a click plan that no conversion names costs one lookup and no write.

use crate::attribution::Scope;
use crate::row::{Stored, Stream};
use crate::writer::Writer;

/// Settles the rows of one stored plan, each stored at its own position.
pub async fn after_store<R: Stored>(writer: &Writer, rows: &[&R]) -> clickhouse::error::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let seeds = match R::STREAM {
        Stream::Conversions => rows.iter().filter_map(|r| r.seed()).collect(),
        Stream::Clicks => {
            let ids: Vec<&str> = rows.iter().map(|r| r.id()).collect();
            writer.conversions_naming(&ids).await?
        }
    };
    if seeds.is_empty() {
        return Ok(());
    }
    writer.attribute(Scope::Customers(&seeds)).await
}
