//! Stop strings in streamed text: which text is safe to emit while a stop string may still be
//! forming, and where to cut when one appears.

/// Finds stop strings in streamed text and decides how much text is safe to emit: anything that
/// could still be the start of a stop string is held back.
#[derive(Debug, Default)]
pub struct StopChecker {
    stops: Vec<String>,
    text: String,
    emitted: usize,
    /// Text up to here was pushed with stop strings off ([`StopChecker::push_unchecked`]): a
    /// stop string counts only if it ends after it.
    unchecked_upto: usize,
}

impl StopChecker {
    /// A checker for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            emitted: 0,
            unchecked_upto: 0,
        }
    }

    /// Adds `piece` without looking for stop strings (vLLM's `min_tokens`: stop strings do not
    /// end a generation before it has that many tokens). Text that may start a stop string is
    /// still held back, so a stop string completed by a later, checked piece is never emitted.
    pub fn push_unchecked(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        self.unchecked_upto = self.text.len();
        self.release()
    }

    /// Adds `piece`; returns the newly safe text and whether a stop string was hit (in which
    /// case the text is cut before it).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        let search_from = self.text.len().saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0));
        self.text.push_str(piece);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                // Only occurrences that end after the unchecked text.
                let from = floor_char(&self.text, search_from.max((self.unchecked_upto + 1).saturating_sub(s.len())));
                self.text[from..].find(s.as_str()).map(|i| i + from)
            })
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            let out = self.text[self.emitted.min(at)..].to_owned();
            self.emitted = self.text.len();
            return (out, true);
        }
        (self.release(), false)
    }

    /// The newly safe text: all but the longest suffix that may start a stop string.
    fn release(&mut self) -> String {
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut safe = self.text.len();
        for s in &self.stops {
            for l in (1..s.len()).rev() {
                if self.text.len() >= l
                    && self.text.is_char_boundary(self.text.len() - l)
                    && s.as_bytes().starts_with(&self.text.as_bytes()[self.text.len() - l..])
                {
                    safe = safe.min(self.text.len() - l);
                    break;
                }
            }
        }
        let out = if safe > self.emitted { self.text[self.emitted..safe].to_owned() } else { String::new() };
        self.emitted = self.emitted.max(safe);
        out
    }

    /// Text held back at the end (emitted when generation ends without a stop string).
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_owned();
        self.emitted = self.text.len();
        out
    }

    /// All text so far (cut at a stop string if one was hit).
    pub fn text(&self) -> &str {
        &self.text
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool, String) {
        let mut c = StopChecker::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = String::new();
        for p in pieces {
            let (o, hit) = c.push(p);
            out.push_str(&o);
            if hit {
                return (out, true, c.text().to_owned());
            }
        }
        out.push_str(&c.flush());
        (out, false, c.text().to_owned())
    }

    #[test]
    fn stop_string_split_across_pieces_is_cut_and_never_emitted() {
        let (out, hit, text) = run(&["STOP"], &["hello S", "TO", "P world"]);
        assert!(hit);
        assert_eq!(out, "hello ");
        assert_eq!(text, "hello ");
    }

    #[test]
    fn held_back_prefix_is_flushed_when_no_stop_follows() {
        let (out, hit, _) = run(&["STOP"], &["a ST", "x"]);
        assert!(!hit);
        assert_eq!(out, "a STx");
        let (out, _, _) = run(&["STOP"], &["end ST"]);
        assert_eq!(out, "end ST");
    }

    #[test]
    fn a_stop_string_ending_in_unchecked_text_does_not_stop_but_one_ending_after_does() {
        let mut c = StopChecker::new(&["AB".to_owned()]);
        let mut out = c.push_unchecked("xAB y A");
        assert_eq!(out, "xAB y ", "the trailing `A` may start a stop string");
        let (o, hit) = c.push("B z");
        out.push_str(&o);
        assert!(hit, "`AB` completed by a checked piece stops");
        assert_eq!(out, "xAB y ");
    }

    #[test]
    fn multibyte_text_before_a_stop_is_kept_whole() {
        let (out, hit, _) = run(&["\n\n"], &["héllo wörld", "\n", "\nmore"]);
        assert!(hit);
        assert_eq!(out, "héllo wörld");
    }
}
