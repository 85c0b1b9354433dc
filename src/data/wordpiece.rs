//! Training a WordPiece vocabulary, reproducibly.
//!
//! The algorithm of `tokenizers`' `WordPieceTrainer` (BPE merges over words whose
//! non-initial characters carry the `##` prefix, `min_frequency`, `limit_alphabet`),
//! with every order decided by the data alone: the alphabet and the `##` pieces are
//! numbered in character order, and among equally frequent pairs the one whose two
//! tokens sort first is merged. `tokenizers` numbers `##` pieces in hash-map order,
//! so its ties — and its vocabularies — differ run to run
//! (huggingface/tokenizers#1794).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

const PREFIX: &str = "##";

/// A word's symbols (token ids) and how often it occurs.
struct Word {
    symbols: Vec<u32>,
    count: u64,
}

/// Adds (`sign` = 1) or removes (−1) a word's adjacent pairs from the counts.
fn count_pairs(
    word: &Word,
    index: usize,
    sign: i64,
    counts: &mut HashMap<(u32, u32), i64>,
    places: &mut HashMap<(u32, u32), HashSet<usize>>,
) {
    for w in word.symbols.windows(2) {
        let pair = (w[0], w[1]);
        let c = counts.entry(pair).or_insert(0);
        *c += sign * word.count as i64;
        if *c <= 0 {
            counts.remove(&pair);
        }
        if sign > 0 {
            places.entry(pair).or_default().insert(index);
        }
    }
}

/// A vocabulary (tokens in id order) of at most `vocab_size` tokens learned from
/// word counts: `specials` first, then the alphabet (the `limit_alphabet` most
/// frequent characters, in character order), the `##` continuations of those that
/// occur inside words, then one token per merge while a pair occurs `min_frequency`
/// times.
pub fn train(
    word_counts: &HashMap<String, u64>,
    vocab_size: usize,
    specials: &[&str],
    (min_frequency, limit_alphabet): (u64, usize),
) -> Vec<String> {
    let mut char_counts: BTreeMap<char, u64> = BTreeMap::new();
    for (w, c) in word_counts {
        for ch in w.chars() {
            *char_counts.entry(ch).or_insert(0) += c;
        }
    }
    let mut by_count: Vec<(char, u64)> = char_counts.into_iter().collect();
    // Most frequent first; ties in character order (a stable sort keeps it).
    by_count.sort_by_key(|&(_, count)| std::cmp::Reverse(count));
    let alphabet: BTreeSet<char> = by_count
        .iter()
        .take(limit_alphabet)
        .map(|(c, _)| *c)
        .collect();

    let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    let mut ids: HashMap<String, u32> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| (s.to_string(), i as u32))
        .collect();
    let mut add = |t: String, tokens: &mut Vec<String>| -> u32 {
        *ids.entry(t.clone()).or_insert_with(|| {
            tokens.push(t);
            (tokens.len() - 1) as u32
        })
    };
    for c in &alphabet {
        add(c.to_string(), &mut tokens);
    }
    // The continuation of each alphabet character that occurs inside a word.
    let inner: BTreeSet<char> = word_counts
        .keys()
        .flat_map(|w| w.chars().skip(1))
        .filter(|c| alphabet.contains(c))
        .collect();
    for c in &inner {
        add(format!("{PREFIX}{c}"), &mut tokens);
    }
    // Words in a fixed order (their text), as symbols.
    let mut sorted: Vec<(&String, &u64)> = word_counts.iter().collect();
    sorted.sort();
    let mut words: Vec<Word> = sorted
        .into_iter()
        .map(|(w, &count)| {
            let symbols = w
                .chars()
                .enumerate()
                .filter(|(_, c)| alphabet.contains(c))
                .map(|(i, c)| {
                    let t = if i == 0 {
                        c.to_string()
                    } else {
                        format!("{PREFIX}{c}")
                    };
                    add(t, &mut tokens)
                })
                .collect();
            Word { symbols, count }
        })
        .collect();

    let mut counts: HashMap<(u32, u32), i64> = HashMap::new();
    let mut places: HashMap<(u32, u32), HashSet<usize>> = HashMap::new();
    for (i, w) in words.iter().enumerate() {
        count_pairs(w, i, 1, &mut counts, &mut places);
    }
    while tokens.len() < vocab_size {
        let Some((&pair, &count)) = counts.iter().max_by(|a, b| {
            a.1.cmp(b.1).then_with(|| {
                let name =
                    |p: &(u32, u32)| (tokens[p.0 as usize].as_str(), tokens[p.1 as usize].as_str());
                name(b.0).cmp(&name(a.0))
            })
        }) else {
            break;
        };
        if (count as u64) < min_frequency {
            break;
        }
        let right = tokens[pair.1 as usize]
            .strip_prefix(PREFIX)
            .unwrap_or(&tokens[pair.1 as usize]);
        let merged = format!("{}{right}", tokens[pair.0 as usize]);
        let id = add(merged, &mut tokens);
        let mut affected: Vec<usize> = places
            .remove(&pair)
            .unwrap_or_default()
            .into_iter()
            .collect();
        affected.sort_unstable();
        for i in affected {
            count_pairs(&words[i], i, -1, &mut counts, &mut places);
            let w = &mut words[i];
            let mut out = Vec::with_capacity(w.symbols.len());
            let mut k = 0;
            while k < w.symbols.len() {
                if k + 1 < w.symbols.len() && (w.symbols[k], w.symbols[k + 1]) == pair {
                    out.push(id);
                    k += 2;
                } else {
                    out.push(w.symbols[k]);
                    k += 1;
                }
            }
            w.symbols = out;
            count_pairs(&words[i], i, 1, &mut counts, &mut places);
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_counts_merge_in_token_order_and_rare_pairs_stay_apart() {
        let counts: HashMap<String, u64> = [("cd", 3), ("ab", 3), ("abd", 1), ("e", 1)]
            .into_iter()
            .map(|(w, c)| (w.to_string(), c))
            .collect();
        let vocab = train(&counts, 100, &["[UNK]"], (2, 1000));
        let expected = [
            "[UNK]", "a", "b", "c", "d", "e", "##b", "##d",
            // (a, ##b) occurs 4 times, (c, ##d) 3: ab first; then cd; then (ab, ##d)
            // occurs once, under min_frequency.
            "ab", "cd",
        ];
        assert_eq!(vocab, expected);
        // Ties: both pairs 3 times, "a ##b" sorts before "c ##d".
        let tied: HashMap<String, u64> = [("cd", 3), ("ab", 3)]
            .into_iter()
            .map(|(w, c)| (w.to_string(), c))
            .collect();
        let vocab = train(&tied, 100, &["[UNK]"], (2, 1000));
        assert_eq!(&vocab[vocab.len() - 2..], ["ab", "cd"]);
        // The size limit counts everything, and the alphabet limit keeps the most frequent.
        assert_eq!(train(&counts, 9, &["[UNK]"], (2, 1000)).len(), 9);
        let small = train(&counts, 100, &["[UNK]"], (2, 2));
        assert!(small.contains(&"a".to_string()) && !small.contains(&"e".to_string()));
    }
}
