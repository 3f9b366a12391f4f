//! Whether a training run learned: what its counts and losses say, as
//! findings that name the fix (the `finetune` stage warns of each).

use super::IGNORE;
use super::trainer::{Block, Keep, Metrics};

/// Tokens per trained parameter below which a run warns: the example's
/// scratch GPT-2 learns its language at 0.087 (115,840 tokens, 1.34M
/// parameters, eval loss 8.3 to 3.3); the 300-line corpus that learned
/// nothing had 0.007.
pub const TOKENS_PER_PARAMETER: f64 = 0.05;

/// The same for LoRA, a tenth: its factors adapt a model that already
/// knows a language. SmolLM2-135M-Instruct's rank-16 adapter on every
/// projection, with the demo language's new token rows, trains 7.30M
/// parameters on 110,208 tokens (0.015 per parameter) and learns (eval loss
/// 7.86 to 4.76, the corpus's unigram model 5.65), which 0.05 would call too
/// little.
pub const TOKENS_PER_LORA_PARAMETER: f64 = 0.005;

/// Relative rise of the eval loss over its best that counts as overfitting
/// (below it, the noise of a small eval split).
const RISE: f64 = 0.02;

/// Something a run's figures show, with its fix.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub code: &'static str,
    pub message: String,
    pub help: String,
}

/// What the `finetune` stage knows of a run.
pub struct Run<'a> {
    /// Trained positions of the train split (one epoch).
    pub train_tokens: usize,
    /// Documents (lines, records) of the train split.
    pub train_documents: usize,
    /// Tokens of the eval split, before packing.
    pub eval_tokens: usize,
    pub eval_blocks: usize,
    pub block_size: usize,
    /// Whether LoRA trained (else every weight did).
    pub lora: bool,
    pub keep: Keep,
    pub metrics: &'a Metrics,
    /// The eval split's loss under the train split's unigram frequencies.
    pub unigram_loss: Option<f64>,
}

/// The findings of `run`, in the order a reader should act on them.
pub fn findings(run: &Run<'_>) -> Vec<Finding> {
    let mut found = Vec::new();
    found.extend(small_corpus(run));
    found.extend(no_eval(run));
    found.extend(overfitting(run));
    found.extend(unigram(run));
    found
}

fn small_corpus(run: &Run<'_>) -> Option<Finding> {
    let parameters = run.metrics.trainable_parameters;
    if parameters == 0 {
        return None;
    }
    let ratio = run.train_tokens as f64 / parameters as f64;
    let least = if run.lora {
        TOKENS_PER_LORA_PARAMETER
    } else {
        TOKENS_PER_PARAMETER
    };
    if ratio >= least {
        return None;
    }
    let needed = (least * parameters as f64).ceil() as usize;
    let per_document = run.train_tokens as f64 / run.train_documents.max(1) as f64;
    let documents = (needed as f64 / per_document.max(1.0)).ceil() as usize;
    let fewer = if run.lora {
        "a lower `finetune.rank` or fewer `finetune.targets`"
    } else {
        "a smaller model (for a scratch base, `base.n_embd` and `base.n_layer`), or \
        `finetune.method = \"lora\"` on a pretrained base"
    };
    Some(Finding {
        code: "small-corpus",
        message: format!(
            "the train split has {} tokens for {} trained parameters ({ratio:.3} tokens per \
            parameter, {} optimizer steps): too little text for this model to learn from",
            thousands(run.train_tokens),
            thousands(parameters),
            run.metrics.steps
        ),
        help: format!(
            "about {} tokens would do (some {} documents like these, {least} tokens per \
            parameter); or train fewer parameters: {fewer}",
            thousands(needed),
            thousands(documents),
        ),
    })
}

fn no_eval(run: &Run<'_>) -> Option<Finding> {
    if run.eval_blocks > 0 {
        return None;
    }
    let block = run.block_size + 1;
    let message = if run.eval_tokens == 0 {
        "the eval split is empty: no eval loss was measured, so nothing says whether the model \
        learned or only memorised"
            .to_string()
    } else {
        format!(
            "the eval split has {} tokens, less than one block of {block}: no eval loss was \
            measured, so nothing says whether the model learned or only memorised",
            thousands(run.eval_tokens)
        )
    };
    let total = (run.train_tokens + run.eval_tokens).max(1);
    // Two blocks, rounded up to a hundredth.
    let fraction = ((2 * block) as f64 / total as f64 * 100.0).ceil() / 100.0;
    let help = if fraction <= 0.3 {
        format!(
            "hold out at least {} tokens: `corpus.eval_fraction = {fraction:.2}`, or held-out \
            files in `corpus.eval_files`",
            thousands(2 * block)
        )
    } else {
        format!(
            "the corpus is too small to hold out {} tokens: add text, or name held-out files in \
            `corpus.eval_files`",
            thousands(2 * block)
        )
    };
    Some(Finding {
        code: "no-eval",
        message,
        help,
    })
}

fn overfitting(run: &Run<'_>) -> Option<Finding> {
    let evals: Vec<(usize, f64)> = run
        .metrics
        .eval_loss
        .iter()
        .copied()
        .filter(|e| e.0 > 0 && e.1.is_finite())
        .collect();
    let &(best_step, best) = evals.iter().min_by(|a, b| a.1.total_cmp(&b.1))?;
    let &(last_step, last) = evals.last()?;
    if last_step <= best_step || last <= best * (1.0 + RISE) {
        return None;
    }
    // The training loss over the steps before each: did it fall?
    let span = (last_step - best_step).max(1);
    let mean = |end: usize| -> Option<f64> {
        let losses: Vec<f64> = run
            .metrics
            .train_loss
            .iter()
            .filter(|t| t.0 + span > end && t.0 <= end)
            .map(|t| t.1)
            .collect();
        (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64)
    };
    let (then, now) = (mean(best_step)?, mean(last_step)?);
    if now >= then {
        return None;
    }
    let help = match run.keep {
        Keep::Best => format!(
            "symb kept step {best_step}'s weights (`finetune.keep = \"best\"`); to stop there, \
            `finetune.max_steps = {best_step}` or `finetune.early_stopping_patience = 2`, or add \
            text"
        ),
        Keep::Last => format!(
            "`finetune.keep = \"best\"` ships step {best_step}'s weights instead of the last; or \
            `finetune.max_steps = {best_step}`, or add text"
        ),
    };
    Some(Finding {
        code: "overfitting",
        message: format!(
            "the eval loss rose from {best:.3} at step {best_step} to {last:.3} at step \
            {last_step} while the training loss fell from {then:.3} to {now:.3}: after step \
            {best_step} the model learns the train split by heart"
        ),
        help,
    })
}

fn unigram(run: &Run<'_>) -> Option<Finding> {
    let unigram = run.unigram_loss?;
    let (step, loss) = run
        .metrics
        .kept
        .or_else(|| run.metrics.eval_loss.last().copied())?;
    if loss < unigram {
        return None;
    }
    Some(Finding {
        code: "unigram",
        message: format!(
            "the eval loss at step {step}, {loss:.3}, is no better than a unigram model of the \
            corpus ({unigram:.3}: each token's frequency alone): the model has not learned which \
            tokens follow which"
        ),
        help: "train longer (`finetune.epochs`, `finetune.max_steps`) or on more text; check \
            `finetune.learning_rate`"
            .to_string(),
    })
}

/// Longest cycle, in tokens, that counts as a loop.
const CYCLE: usize = 8;

/// How many times a cycle repeats at the end of `tokens` to count as a
/// loop (and at least [`CYCLE`] tokens in all).
const REPEATS: usize = 3;

/// The loop `tokens` end in, if any: the shortest period `p` (at most
/// [`CYCLE`]) whose last `covered` tokens repeat it, with `covered` at least
/// `REPEATS · p` and [`CYCLE`] (`krishatatatatata`: period 1 or 2).
pub fn loop_at_end(tokens: &[u32]) -> Option<(usize, usize)> {
    (1..=CYCLE).find_map(|p| {
        let n = tokens.len();
        if n <= p {
            return None;
        }
        let same = (p..n)
            .rev()
            .take_while(|&i| tokens[i] == tokens[i - p])
            .count();
        let covered = same + p;
        (covered >= (REPEATS * p).max(CYCLE)).then_some((p, covered))
    })
}

/// A finding when at least a quarter of the greedy continuations (each a
/// prompt's text and its continuation's, and its tokens without the end
/// token) end in a loop.
pub fn repetition(continuations: &[(String, String, Vec<u32>)]) -> Option<Finding> {
    let looping: Vec<&(String, String, Vec<u32>)> = continuations
        .iter()
        .filter(|c| loop_at_end(&c.2).is_some())
        .collect();
    let first = looping.first()?;
    if looping.len() * 4 < continuations.len() {
        return None;
    }
    let shown: String = first.1.chars().take(80).collect();
    Some(Finding {
        code: "repetition",
        message: format!(
            "{} of {} greedy continuations end in a loop of a few tokens repeated, e.g. {:?} \
            goes on {:?}",
            looping.len(),
            continuations.len(),
            first.0,
            shown
        ),
        help: "a model that loops has learned too little to go on (see the other warnings): \
            train longer or on more text; in a page, sampling (`temperature`) or transformers.js's \
            `repetition_penalty` hides it"
            .to_string(),
    })
}

/// The mean loss over `eval`'s trained positions of predicting each token by
/// its frequency among `train`'s (add-one smoothing over `vocab` tokens).
pub fn unigram_loss(train: &[Block], eval: &[Block], vocab: usize) -> Option<f64> {
    let mut counts = vec![0u64; vocab];
    let mut total = 0u64;
    for label in train.iter().flat_map(|b| &b.labels) {
        if *label != IGNORE
            && let Some(c) = counts.get_mut(*label as usize)
        {
            *c += 1;
            total += 1;
        }
    }
    let (mut sum, mut n) = (0.0, 0usize);
    for &label in eval.iter().flat_map(|b| &b.labels) {
        if label == IGNORE {
            continue;
        }
        let count = counts.get(label as usize).copied().unwrap_or(0);
        sum -= ((count + 1) as f64 / (total + vocab as u64) as f64).ln();
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

/// Character n-gram orders of chrF.
const CHRF_ORDER: usize = 6;

/// chrF (Popović 2015) of hypotheses against references, as sacreBLEU
/// computes a corpus's (its defaults: character 1- to 6-grams, whitespace
/// removed, β = 2): the n-gram counts summed over the pairs; precision and
/// recall averaged over the orders both sides have; their F-β, 0 to 100.
pub fn chrf<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    use std::collections::HashMap;
    // (hypothesis n-grams, reference n-grams, matched) per order.
    let mut stats = [(0usize, 0usize, 0usize); CHRF_ORDER];
    for (hypothesis, reference) in pairs {
        let grams = |text: &str, n: usize| -> HashMap<String, usize> {
            let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
            let mut counts = HashMap::new();
            for window in chars.windows(n) {
                *counts.entry(window.iter().collect()).or_insert(0) += 1;
            }
            counts
        };
        for (n, stat) in (1..=CHRF_ORDER).zip(stats.iter_mut()) {
            let (h, r) = (grams(hypothesis, n), grams(reference, n));
            stat.0 += h.values().sum::<usize>();
            stat.1 += r.values().sum::<usize>();
            stat.2 += h
                .iter()
                .map(|(g, c)| (*c).min(r.get(g).copied().unwrap_or(0)))
                .sum::<usize>();
        }
    }
    let (mut precision, mut recall, mut orders) = (0.0, 0.0, 0);
    for &(h, r, m) in &stats {
        if h > 0 && r > 0 {
            precision += m as f64 / h as f64;
            recall += m as f64 / r as f64;
            orders += 1;
        }
    }
    if orders == 0 {
        return 0.0;
    }
    let (p, r) = (precision / orders as f64, recall / orders as f64);
    const BETA2: f64 = 4.0;
    if p + r == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + BETA2) * p * r / (BETA2 * p + r)
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(train: &[(usize, f64)], eval: &[(usize, f64)], parameters: usize) -> Metrics {
        Metrics {
            train_loss: train.to_vec(),
            eval_loss: eval.to_vec(),
            steps: train.last().map_or(0, |t| t.0),
            trainable_parameters: parameters,
            ..Metrics::default()
        }
    }

    fn run(metrics: &Metrics) -> Run<'_> {
        Run {
            train_tokens: 100_000,
            train_documents: 5_000,
            eval_tokens: 5_000,
            eval_blocks: 40,
            block_size: 128,
            lora: false,
            keep: Keep::Best,
            metrics,
            unigram_loss: Some(5.0),
        }
    }

    fn codes(found: &[Finding]) -> Vec<&str> {
        found.iter().map(|f| f.code).collect()
    }

    #[test]
    fn a_healthy_run_finds_nothing() {
        let train: Vec<(usize, f64)> = (1..=200).map(|s| (s, 8.0 - s as f64 / 50.0)).collect();
        let m = metrics(&train, &[(0, 8.3), (100, 4.0), (200, 3.3)], 1_000_000);
        assert_eq!(codes(&findings(&run(&m))), Vec::<&str>::new());
    }

    #[test]
    fn each_finding_names_its_figures_and_fix() {
        // 300 lines: 6 steps, no eval block, 0.007 tokens per parameter.
        let m = metrics(&[(6, 5.78)], &[], 900_000);
        let mut r = run(&m);
        (
            r.train_tokens,
            r.train_documents,
            r.eval_tokens,
            r.eval_blocks,
        ) = (6_000, 285, 90, 0);
        let found = findings(&r);
        assert_eq!(codes(&found), ["small-corpus", "no-eval"]);
        assert!(
            found[0]
                .message
                .contains("6,000 tokens for 900,000 trained parameters")
        );
        assert!(found[0].help.contains("45,000 tokens") && found[0].help.contains("2,138"));
        assert!(
            found[1]
                .message
                .contains("90 tokens, less than one block of 129")
        );
        assert!(found[1].help.contains("corpus.eval_fraction = 0.05"));
        // 0.007 tokens per parameter is enough for LoRA's (0.005), not below it.
        r.lora = true;
        assert_eq!(codes(&findings(&r)), ["no-eval"]);
        r.train_tokens = 4_000;
        assert!(findings(&r)[0].help.contains("4,500 tokens would do"));

        // Eval rises from step 50 while training falls.
        let train: Vec<(usize, f64)> = (1..=200).map(|s| (s, 6.0 - s as f64 / 50.0)).collect();
        let m = metrics(
            &train,
            &[(0, 8.0), (50, 4.1), (100, 4.3), (200, 4.9)],
            10_000,
        );
        let found = findings(&run(&m));
        assert_eq!(codes(&found), ["overfitting"]);
        assert!(
            found[0]
                .message
                .contains("from 4.100 at step 50 to 4.900 at step 200")
        );
        assert!(found[0].help.contains("kept step 50's weights"));

        // No better than the unigram model.
        let mut m = metrics(&train, &[(0, 8.0), (200, 5.2)], 10_000);
        m.kept = Some((200, 5.2));
        assert_eq!(codes(&findings(&run(&m))), ["unigram"]);
    }

    #[test]
    fn a_loop_is_a_short_cycle_repeated_to_the_end() {
        // "krisha" then "ta" six times.
        let tata = [7, 8, 9, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2];
        assert_eq!(loop_at_end(&tata), Some((2, 12)));
        assert_eq!(loop_at_end(&[5, 5, 5, 5, 5, 5, 5, 5]), Some((1, 8)));
        // Too short to say, or not at the end.
        assert_eq!(loop_at_end(&[1, 2, 1, 2, 1, 2]), None);
        assert_eq!(loop_at_end(&[1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 3, 4, 5]), None);
        let text = |t: &[u32]| ("Ordo".to_string(), "tatata".to_string(), t.to_vec());
        let healthy = text(&[3, 4, 5, 6]);
        assert!(repetition(&[text(&tata), healthy.clone(), healthy.clone()]).is_some());
        let found = repetition(&[
            text(&tata),
            healthy.clone(),
            healthy.clone(),
            healthy.clone(),
            healthy,
        ]);
        assert!(found.is_none(), "one in five is not a quarter");
    }

    #[test]
    fn unigram_loss_is_the_frequency_model() {
        let block = |labels: Vec<u32>| Block {
            inputs: vec![0; labels.len()],
            labels,
            sequences: Vec::new(),
        };
        // Train: token 0 three times, 1 once; vocab 2: p = 4/6, 2/6.
        let train = [block(vec![0, 0, 0, 1])];
        let eval = [block(vec![0, 1, IGNORE])];
        let expected = -((4.0f64 / 6.0).ln() + (2.0f64 / 6.0).ln()) / 2.0;
        let got = unigram_loss(&train, &eval, 2).unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
