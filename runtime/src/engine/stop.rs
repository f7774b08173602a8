//! Stop strings in streamed text: which text is safe to emit while a stop string may still be
//! forming, and where to cut when one appears.

/// Finds stop strings in streamed text and decides how much text is safe to emit: anything that
/// could still be the start of a stop string is held back.
#[derive(Debug, Default)]
pub struct StopChecker {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopChecker {
    /// A checker for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), text: String::new(), emitted: 0 }
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
                self.text[floor_char(&self.text, search_from)..]
                    .find(s.as_str())
                    .map(|i| i + floor_char(&self.text, search_from))
            })
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            let out = self.text[self.emitted.min(at)..].to_owned();
            self.emitted = self.text.len();
            return (out, true);
        }
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
        (out, false)
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
    fn multibyte_text_before_a_stop_is_kept_whole() {
        let (out, hit, _) = run(&["\n\n"], &["héllo wörld", "\n", "\nmore"]);
        assert!(hit);
        assert_eq!(out, "héllo wörld");
    }
}
