//! Paged answers: a request names where to go on (`cursor`, the last key of
//! the page before) and how much to take (`limit`); the master fills a page
//! until the limit or a byte budget (under the bus's maximum payload) and
//! says where the next one starts (`next`).

use serde::{Deserialize, Serialize};

/// Where a paged request starts and how much it takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRequest {
    /// The `next` of the page before; none for the first page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// At most this many items (none: as many as fit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// A page of an answer.
pub trait Paged {
    type Item;
    /// Where the next page starts; none on the last page.
    fn next(&self) -> Option<&str>;
}

/// The items after `page.cursor` of `items` (sorted by their key), up to
/// `page.limit` items and `budget` bytes of JSON, and the cursor of the next
/// page when some are left. A page holds at least one item, so paging always
/// advances.
pub fn take_page<T: Serialize>(
    items: impl IntoIterator<Item = (String, T)>,
    page: &PageRequest,
    budget: usize,
) -> (Vec<T>, Option<String>) {
    let limit = page.limit.unwrap_or(usize::MAX).max(1);
    let mut taken = Vec::new();
    let mut bytes = 0usize;
    let mut last_key: Option<String> = None;
    let mut items = items
        .into_iter()
        .filter(|(key, _)| page.cursor.as_ref().is_none_or(|cursor| key > cursor))
        .peekable();
    while let Some((key, item)) = items.next() {
        let size = serde_json::to_vec(&item).map_or(0, |json| json.len() + 1);
        if !taken.is_empty() && (taken.len() >= limit || bytes + size > budget) {
            // This item starts the next page.
            return (taken, last_key);
        }
        bytes += size;
        taken.push(item);
        last_key = Some(key);
        if items.peek().is_none() {
            return (taken, None);
        }
    }
    (taken, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("k{i:03}"), "x".repeat(10)))
            .collect()
    }

    #[test]
    fn pages_follow_each_other_without_gaps_or_repeats() {
        let all = numbers(25);
        let mut page = PageRequest {
            cursor: None,
            limit: Some(10),
        };
        let mut seen = Vec::new();
        loop {
            let (items, next) = take_page(all.clone(), &page, usize::MAX);
            assert!(items.len() <= 10);
            seen.extend(items);
            match next {
                Some(next) => page.cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25);
    }

    #[test]
    fn a_page_ends_before_its_byte_budget_but_holds_at_least_one_item() {
        let all = numbers(10);
        // Each item is 13 bytes of JSON: a budget of 30 holds two.
        let (items, next) = take_page(all.clone(), &PageRequest::default(), 30);
        assert_eq!(items.len(), 2);
        assert_eq!(next.as_deref(), Some("k001"));
        let (items, next) = take_page(all, &PageRequest::default(), 1);
        assert_eq!(items.len(), 1);
        assert_eq!(next.as_deref(), Some("k000"));
        let (items, next) = take_page(Vec::<(String, u8)>::new(), &PageRequest::default(), 1);
        assert!(items.is_empty() && next.is_none());
    }
}
