//! Where everything is in the lake (DESIGN.md §1, §4): plain functions of names and
//! positions, so every layer builds the same paths.

/// `archive/{pipeline}/`: every segment of a pipeline.
pub fn archive_prefix(pipeline: &str) -> String {
    format!("archive/{pipeline}/")
}

/// `archive/{pipeline}/p={partition}/{lo:020}-{hi:020}.parquet`: the segment `[lo, hi)`.
/// Zero-padded, so listing order is position order.
pub fn archive_path(pipeline: &str, partition: u32, lo: u64, hi: u64) -> String {
    format!("archive/{pipeline}/p={partition}/{lo:020}-{hi:020}.parquet")
}

/// [`archive_path`] of a segment sealed by a node (`serve --node`) holding its partition's
/// lease at `epoch`: `…/{lo}-{hi}.e{epoch}.parquet`. A node that lost the lease while writing
/// cannot overwrite the file the next holder records for the same positions.
pub fn leased_archive_path(pipeline: &str, partition: u32, lo: u64, hi: u64, epoch: u64) -> String {
    format!("archive/{pipeline}/p={partition}/{lo:020}-{hi:020}.e{epoch}.parquet")
}

/// `dead_letters/{pipeline}/`: every rejected event of a pipeline.
pub fn dead_letters_prefix(pipeline: &str) -> String {
    format!("dead_letters/{pipeline}/")
}

/// `dead_letters/{pipeline}/{arrival_ms:020}-{unique}.ndjson`: one batch of rejected events
/// (one JSON object per line, with the reason). Rejected events have no position, so the file is
/// named by arrival time (zero-padded: listing order is arrival order) and a suffix the writer
/// makes unique.
pub fn dead_letter_path(pipeline: &str, arrival_ms: i64, unique: &str) -> String {
    format!("dead_letters/{pipeline}/{arrival_ms:020}-{unique}.ndjson")
}

/// `lookups/{pipeline}/{lookup}/{version}.parquet`: one version of a lookup table, named by
/// the hash of its bytes, written before any event is enriched with it and never changed.
pub fn lookup_path(pipeline: &str, lookup: &str, version: &str) -> String {
    format!("lookups/{pipeline}/{lookup}/{version}.parquet")
}

/// `views/{pipeline}/{view}/`: every published version of a batch view.
pub fn view_prefix(pipeline: &str, view: &str) -> String {
    format!("views/{pipeline}/{view}/")
}

/// `views/{pipeline}/{view}/run={run_id}/`: the batch view written by one run.
pub fn view_run_prefix(pipeline: &str, view: &str, run_id: i64) -> String {
    format!("views/{pipeline}/{view}/run={run_id}/")
}

/// `runs/{pipeline}/run={run_id}/`: scratch files of one batch run (the partials of its groups
/// when it is scaled out), deleted when the run publishes.
pub fn run_scratch_prefix(pipeline: &str, run_id: i64) -> String {
    format!("runs/{pipeline}/run={run_id}/")
}

/// `runs/{pipeline}/`: the scratch files of every batch run of a pipeline.
pub fn runs_prefix(pipeline: &str) -> String {
    format!("runs/{pipeline}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_paths() {
        assert_eq!(archive_prefix("clicks"), "archive/clicks/");
        assert_eq!(
            archive_path("clicks", 3, 0, 500_000),
            "archive/clicks/p=3/00000000000000000000-00000000000000500000.parquet"
        );
        assert_eq!(
            dead_letter_path("clicks", 1_700_000_000_000, "42-7"),
            "dead_letters/clicks/00000001700000000000-42-7.ndjson"
        );
        assert_eq!(dead_letters_prefix("clicks"), "dead_letters/clicks/");
        assert_eq!(
            view_prefix("clicks", "page_views"),
            "views/clicks/page_views/"
        );
        assert_eq!(
            view_run_prefix("clicks", "page_views", 42),
            "views/clicks/page_views/run=42/"
        );
        assert_eq!(runs_prefix("clicks"), "runs/clicks/");
        assert_eq!(
            lookup_path("clicks", "pages", "00ff"),
            "lookups/clicks/pages/00ff.parquet"
        );
        assert!(run_scratch_prefix("clicks", 7).starts_with(&runs_prefix("clicks")));
        // Zero padding keeps lexicographic order = position order.
        assert!(archive_path("a", 0, 9, 10) < archive_path("a", 0, 10, 11));
    }
}
