//! The chart of outcomes over time: jobs per hour or per day, stacked by outcome, drawn as an
//! inline SVG on the server. No JavaScript: each bar carries a `<title>`, which browsers show
//! on hover, and the legend gives the totals as text.

use crate::{
    domain::job::{JobState, UnixMillis},
    store::OutcomeCount,
};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// Drawn when a search names no start: the last week.
const DEFAULT_SPAN_MS: i64 = 7 * DAY_MS;
/// At most about this many bars.
const MAX_BARS: i64 = 96;

/// The chart's size and plot area, in SVG units.
const WIDTH: i64 = 720;
const HEIGHT: i64 = 180;
const LEFT: i64 = 40;
const BOTTOM: i64 = 20;
const TOP: i64 = 8;

/// The time range drawn and the width of a bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub from: UnixMillis,
    pub to: UnixMillis,
    /// A bucket's width: an hour, or a whole number of days.
    pub bucket_ms: i64,
}

impl Span {
    /// The searched range; a missing end is now, a missing start a week before the end.
    pub fn of(created_after: Option<UnixMillis>, created_before: Option<UnixMillis>) -> Span {
        let to = created_before.unwrap_or_else(|| UnixMillis(UnixMillis::now().0 + 1));
        let from = created_after.unwrap_or(UnixMillis(to.0.saturating_sub(DEFAULT_SPAN_MS)));
        let span = to.0.saturating_sub(from.0).max(1);
        let bucket_ms = if span <= MAX_BARS * HOUR_MS {
            HOUR_MS
        } else {
            // Spans are positive: unsigned division rounds up.
            let days = (span as u64).div_ceil(DAY_MS as u64);
            days.div_ceil(MAX_BARS as u64).max(1) as i64 * DAY_MS
        };
        Span {
            from,
            to,
            bucket_ms,
        }
    }

    fn first_bucket(&self) -> i64 {
        self.from.0.div_euclid(self.bucket_ms) * self.bucket_ms
    }

    fn buckets(&self) -> i64 {
        ((self.to.0 - 1).div_euclid(self.bucket_ms) * self.bucket_ms - self.first_bucket())
            / self.bucket_ms
            + 1
    }
}

/// One outcome as the chart groups states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
    InProgress,
}

const OUTCOMES: [Outcome; 4] = [
    Outcome::Succeeded,
    Outcome::Failed,
    Outcome::Cancelled,
    Outcome::InProgress,
];

impl Outcome {
    fn of(state: JobState) -> Outcome {
        match state {
            JobState::Succeeded => Outcome::Succeeded,
            JobState::Failed => Outcome::Failed,
            JobState::Cancelled => Outcome::Cancelled,
            JobState::Queued | JobState::Running | JobState::RetryWait => Outcome::InProgress,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::InProgress => "in progress",
        }
    }

    /// The CSS class that colours it.
    fn class(self) -> &'static str {
        match self {
            Outcome::Succeeded => "o-succeeded",
            Outcome::Failed => "o-failed",
            Outcome::Cancelled => "o-cancelled",
            Outcome::InProgress => "o-progress",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One drawn rectangle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bar {
    pub x: i64,
    pub y: i64,
    pub width: i64,
    pub height: i64,
    pub class: &'static str,
    /// Shown on hover: the bucket, the outcome and the count.
    pub title: String,
}

/// A label under the time axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    pub x: i64,
    pub text: String,
}

/// A legend entry with the outcome's total over the range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegendEntry {
    pub class: &'static str,
    pub name: &'static str,
    pub total: u64,
}

/// Everything the template draws.
#[derive(Debug, Clone)]
pub struct Chart {
    pub width: i64,
    pub height: i64,
    /// The plot area's left edge and bottom (the axes).
    pub left: i64,
    pub baseline: i64,
    pub bars: Vec<Bar>,
    pub ticks: Vec<Tick>,
    pub legend: Vec<LegendEntry>,
    /// The tallest bar's count, written at the top of the axis.
    pub max: u64,
    /// "per hour" or "per day" (or "per N days"), and the range, for the caption.
    pub caption: String,
}

impl Chart {
    /// Lays out `counts` (from [`crate::store::Store::outcome_counts`] over `span`).
    pub fn draw(span: Span, counts: &[OutcomeCount]) -> Chart {
        let first = span.first_bucket();
        let buckets = span.buckets().clamp(1, 10 * MAX_BARS) as usize;
        let mut stacks = vec![[0u64; 4]; buckets];
        let mut totals = [0u64; 4];
        for count in counts {
            let index = (count.bucket.0 - first).div_euclid(span.bucket_ms);
            let Ok(index) = usize::try_from(index) else {
                continue;
            };
            if let Some(stack) = stacks.get_mut(index) {
                let outcome = Outcome::of(count.state).index();
                stack[outcome] += count.jobs;
                totals[outcome] += count.jobs;
            }
        }
        let max = stacks
            .iter()
            .map(|stack| stack.iter().sum::<u64>())
            .max()
            .unwrap_or(0);
        let plot_width = WIDTH - LEFT - 4;
        let plot_height = HEIGHT - BOTTOM - TOP;
        let baseline = HEIGHT - BOTTOM;
        let slot = plot_width / buckets as i64;
        let bar_width = (slot - 1).max(1);
        let mut bars = Vec::new();
        for (i, stack) in stacks.iter().enumerate() {
            let x = LEFT + 1 + i as i64 * slot;
            let start = UnixMillis(first + i as i64 * span.bucket_ms);
            let mut y = baseline;
            for outcome in OUTCOMES {
                let jobs = stack[outcome.index()];
                if jobs == 0 || max == 0 {
                    continue;
                }
                let height = ((jobs as i64 * plot_height) / max as i64).max(1);
                y -= height;
                bars.push(Bar {
                    x,
                    y,
                    width: bar_width,
                    height,
                    class: outcome.class(),
                    title: format!("{}: {jobs} {}", bucket_label(start, span), outcome.name()),
                });
            }
        }
        let every = (buckets / 6).max(1);
        let ticks = (0..buckets)
            .step_by(every)
            .map(|i| Tick {
                x: LEFT + 1 + i as i64 * slot,
                text: tick_label(UnixMillis(first + i as i64 * span.bucket_ms), span),
            })
            .collect();
        let legend = OUTCOMES
            .iter()
            .map(|outcome| LegendEntry {
                class: outcome.class(),
                name: outcome.name(),
                total: totals[outcome.index()],
            })
            .collect();
        let per = match span.bucket_ms {
            HOUR_MS => "per hour".to_string(),
            DAY_MS => "per day".to_string(),
            other => format!("per {} days", other / DAY_MS),
        };
        Chart {
            width: WIDTH,
            height: HEIGHT,
            left: LEFT,
            baseline,
            bars,
            ticks,
            legend,
            max,
            caption: format!(
                "Jobs created {per}, by outcome, from {} to {} (UTC)",
                minutes(span.from),
                minutes(span.to)
            ),
        }
    }
}

fn rfc3339(at: UnixMillis) -> String {
    super::search::format_time(at)
}

/// `2026-11-01 10:00`.
fn minutes(at: UnixMillis) -> String {
    let text = rfc3339(at);
    text.get(..16).unwrap_or(&text).replace('T', " ")
}

fn bucket_label(start: UnixMillis, span: Span) -> String {
    if span.bucket_ms == HOUR_MS {
        minutes(start)
    } else {
        rfc3339(start).get(..10).unwrap_or_default().to_string()
    }
}

fn tick_label(start: UnixMillis, span: Span) -> String {
    let text = rfc3339(start);
    if span.bucket_ms == HOUR_MS {
        // `11-01 10h`
        format!(
            "{} {}h",
            text.get(5..10).unwrap_or_default(),
            text.get(11..13).unwrap_or_default()
        )
    } else {
        text.get(..10).unwrap_or_default().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ranges_are_drawn_per_hour_and_long_ones_per_day() {
        let day = |n: i64| UnixMillis(1_790_000_000_000 + n * DAY_MS);
        assert_eq!(Span::of(Some(day(0)), Some(day(2))).bucket_ms, HOUR_MS);
        assert_eq!(Span::of(Some(day(0)), Some(day(30))).bucket_ms, DAY_MS);
        assert_eq!(Span::of(Some(day(0)), Some(day(365))).bucket_ms, 4 * DAY_MS);
        assert_eq!(Span::of(None, Some(day(7))).from, day(0));
    }

    #[test]
    fn bars_stack_by_outcome_and_the_legend_counts_them() {
        let from = UnixMillis(1_790_000_000_000 / HOUR_MS * HOUR_MS);
        let span = Span {
            from,
            to: UnixMillis(from.0 + 3 * HOUR_MS),
            bucket_ms: HOUR_MS,
        };
        let counts = [
            OutcomeCount {
                bucket: from,
                state: JobState::Succeeded,
                jobs: 3,
            },
            OutcomeCount {
                bucket: from,
                state: JobState::Failed,
                jobs: 1,
            },
            OutcomeCount {
                bucket: UnixMillis(from.0 + 2 * HOUR_MS),
                state: JobState::Queued,
                jobs: 2,
            },
        ];
        let chart = Chart::draw(span, &counts);
        assert_eq!(chart.max, 4);
        assert_eq!(chart.bars.len(), 3);
        // The first bucket's stack fills the plot height exactly.
        let first: i64 = chart.bars[..2].iter().map(|bar| bar.height).sum();
        assert_eq!(first, HEIGHT - BOTTOM - TOP);
        assert!(
            chart.bars[1].title.ends_with("1 failed"),
            "{:?}",
            chart.bars[1]
        );
        let totals: Vec<u64> = chart.legend.iter().map(|entry| entry.total).collect();
        assert_eq!(totals, [3, 1, 0, 2]);
    }
}
