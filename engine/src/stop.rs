//! Stop sequences over streamed text.
//!
//! Text arrives in pieces; a stop string may straddle two pieces. The matcher emits text only
//! once it cannot be the start of a stop string, holds back the longest tail that still could be,
//! and on a match emits what came before the stop string and reports the stop.

/// What to emit after feeding a piece of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text safe to send to the client now.
    pub emit: String,
    /// Set when a stop string completed: the index of the stop string that matched.
    pub stopped: Option<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet emitted (a possible stop-string prefix).
    held: String,
}

impl StopMatcher {
    /// Empty strings are ignored: they would match before any output.
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    pub fn push(&mut self, piece: &str) -> StopOutcome {
        self.held.push_str(piece);
        // The earliest match wins; among matches at the same place, the first stop string.
        let hit = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|pos| (pos, i)))
            .min();
        if let Some((pos, i)) = hit {
            let emit = self.held[..pos].to_string();
            self.held.clear();
            return StopOutcome {
                emit,
                stopped: Some(i),
            };
        }
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let split = self.held.len() - keep;
        let emit = self.held[..split].to_string();
        self.held.drain(..split);
        StopOutcome {
            emit,
            stopped: None,
        }
    }

    /// At the end of generation: the held-back text, which turned out not to be a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `stop`, on char
/// boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start)
                && stop.is_char_boundary(n)
                && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_pieces_is_caught_and_not_emitted() {
        let mut m = StopMatcher::new(&["</s>".to_string()]);
        let mut out = String::new();
        for piece in ["Hello <", "/", "s> world"] {
            let o = m.push(piece);
            out.push_str(&o.emit);
            if o.stopped.is_some() {
                assert_eq!(out, "Hello ");
                return;
            }
        }
        panic!("stop string was not detected");
    }

    #[test]
    fn a_false_start_is_released() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("ab ST").emit, "ab ");
        assert_eq!(m.push("ART").emit, "START");
        assert_eq!(m.push("S").emit, "");
        assert_eq!(m.finish(), "S");
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        let mut m = StopMatcher::new(&["你好吗".to_string()]);
        assert_eq!(m.push("说你好").emit, "说");
        let o = m.push("吗?");
        assert_eq!((o.emit.as_str(), o.stopped), ("", Some(0)));
    }
}
