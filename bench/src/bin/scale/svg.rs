//! A line chart as SVG text (pure, no dependency): series of (x, y)
//! points over a logarithmic or linear x axis, a linear y axis from 0,
//! "nice" ticks, a legend. Enough for a curve of a cost against the
//! cluster's size.

use std::fmt::Write as _;

/// One line of the chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its name in the legend.
    pub name: String,
    /// Its points, in x order.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (e.g. a baseline run).
    pub dashed: bool,
    /// Its colour, an index into the palette (the same quantity of two
    /// runs shares one, dashed for one of them).
    pub color: usize,
}

/// A chart.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// The x axis' label.
    pub x_label: String,
    /// The y axis' label.
    pub y_label: String,
    /// A logarithmic x axis (powers of ten).
    pub log_x: bool,
    /// The lines.
    pub series: Vec<Series>,
}

/// A chart's width.
pub const W: f64 = 760.0;
/// A chart's height.
pub const H: f64 = 460.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 64.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Text made safe inside an SVG element or attribute.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A tick step of 1, 2 or 5 times a power of ten giving about `want`
/// ticks over `0..=max`.
pub fn nice_step(max: f64, want: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / want.max(1.0);
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    let f = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    f * p
}

/// A number as a tick label: no trailing zeros, thousands as `k`.
pub fn label(v: f64) -> String {
    if v != 0.0 && v.abs() >= 10_000.0 && (v / 1000.0).fract() == 0.0 {
        return format!("{}k", v / 1000.0);
    }
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

impl Chart {
    /// The SVG document.
    pub fn render(&self) -> String {
        let pts = || self.series.iter().flat_map(|s| s.points.iter());
        let usable = |x: f64| x.is_finite() && (!self.log_x || x > 0.0);
        let xs: Vec<f64> = pts().map(|p| p.0).filter(|x| usable(*x)).collect();
        let y_max = pts()
            .map(|p| p.1)
            .filter(|y| y.is_finite())
            .fold(0.0f64, f64::max);
        let (mut x0, mut x1) = xs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                (a.min(*x), b.max(*x))
            });
        if xs.is_empty() {
            (x0, x1) = (1.0, 10.0);
        }
        if self.log_x {
            x0 = 10f64.powf(x0.log10().floor());
            x1 = 10f64.powf(x1.log10().ceil());
            if x1 <= x0 {
                x1 = x0 * 10.0;
            }
        } else {
            x0 = x0.min(0.0);
            if x1 <= x0 {
                x1 = x0 + 1.0;
            }
        }
        let step = nice_step(y_max, 6.0);
        let y_top = if y_max <= 0.0 {
            step
        } else {
            (y_max / step).ceil() * step
        };
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let fx = |x: f64| {
            let t = if self.log_x {
                (x.log10() - x0.log10()) / (x1.log10() - x0.log10())
            } else {
                (x - x0) / (x1 - x0)
            };
            LEFT + t * pw
        };
        let fy = |y: f64| TOP + ph - (y / y_top) * ph;

        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            o,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
            W / 2.0,
            escape(&self.title)
        );
        // Grid and y ticks.
        let mut y = 0.0;
        while y <= y_top + step / 2.0 {
            let py = fy(y);
            let _ = writeln!(
                o,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                py + 4.0,
                label(y)
            );
            y += step;
        }
        // x ticks: powers of ten (log) or nice steps (linear).
        let mut ticks = Vec::new();
        if self.log_x {
            let mut t = x0;
            while t <= x1 * 1.000_001 {
                ticks.push(t);
                t *= 10.0;
            }
        } else {
            let s = nice_step(x1 - x0, 6.0);
            let mut t = (x0 / s).ceil() * s;
            while t <= x1 + s / 2.0 {
                ticks.push(t);
                t += s;
            }
        }
        for t in ticks {
            let px = fx(t);
            let _ = writeln!(
                o,
                r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 18.0,
                label(t)
            );
        }
        // Axes and their labels.
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="#333"/>"##,
            TOP + ph,
            LEFT + pw,
            TOP + ph,
            TOP + ph
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 18.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            o,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            escape(&self.y_label)
        );
        // Lines, points, legend.
        for (i, s) in self.series.iter().enumerate() {
            let color = COLORS[s.color % COLORS.len()];
            let dash = if s.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let p: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| usable(*x) && y.is_finite())
                .collect();
            if p.len() > 1 {
                let d: Vec<String> = p
                    .iter()
                    .map(|(x, y)| format!("{:.1},{:.1}", fx(*x), fy(*y)))
                    .collect();
                let _ = writeln!(
                    o,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
                    d.join(" ")
                );
            }
            for (x, y) in &p {
                let _ = writeln!(
                    o,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{}: {} at {}</title></circle>"#,
                    fx(*x),
                    fy(*y),
                    escape(&s.name),
                    label(*y),
                    label(*x)
                );
            }
            let ly = TOP + 14.0 + 18.0 * i as f64;
            let _ = writeln!(
                o,
                r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
                LEFT + 12.0,
                LEFT + 40.0,
                LEFT + 46.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
        o.push_str("</svg>\n");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(log_x: bool) -> Chart {
        Chart {
            title: "Agent RSS <against> N & more".into(),
            x_label: "fake nodes".into(),
            y_label: "MiB".into(),
            log_x,
            series: vec![
                Series {
                    name: "leader".into(),
                    points: vec![(10.0, 22.0), (100.0, 40.0), (1000.0, 364.0)],
                    dashed: false,
                    color: 0,
                },
                Series {
                    name: "others (old)".into(),
                    points: vec![(10.0, 21.0), (100.0, 30.0), (1000.0, 94.0)],
                    dashed: true,
                    color: 1,
                },
            ],
        }
    }

    #[test]
    fn steps_and_labels() {
        assert_eq!(nice_step(364.0, 6.0), 100.0);
        assert_eq!(nice_step(94.0, 6.0), 20.0);
        assert_eq!(nice_step(1.0, 6.0), 0.2);
        assert_eq!(nice_step(0.0, 6.0), 1.0);
        assert_eq!(label(100.0), "100");
        assert_eq!(label(0.2), "0.2");
        assert_eq!(label(10_000.0), "10k");
        assert_eq!(label(1000.0), "1000");
        assert_eq!(label(0.0), "0");
    }

    #[test]
    fn draws_every_series_and_point_on_a_log_axis() {
        let svg = chart(true).render();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 6);
        assert_eq!(svg.matches("stroke-dasharray").count(), 2); // line + legend
        // Escaped text; ticks at the powers of ten; y up to 400.
        assert!(svg.contains("Agent RSS &lt;against&gt; N &amp; more"));
        for t in [">10<", ">100<", ">1000<", ">400<"] {
            assert!(svg.contains(t), "{t} in {svg}");
        }
        // Larger values are drawn higher (smaller y); x grows to the right.
        let cy: Vec<f64> = svg
            .match_indices("<circle cx=\"")
            .map(|(i, _)| {
                let rest = &svg[i..];
                let c = rest.split("cy=\"").nth(1).unwrap();
                c[..c.find('"').unwrap()].parse().unwrap()
            })
            .collect();
        assert!(cy[0] > cy[1] && cy[1] > cy[2], "{cy:?}");
        // Evenly spaced on a log axis: 10, 100, 1000.
        let cx: Vec<f64> = svg
            .match_indices("<circle cx=\"")
            .map(|(i, _)| {
                let c = &svg[i + 12..];
                c[..c.find('"').unwrap()].parse().unwrap()
            })
            .collect();
        assert!(((cx[1] - cx[0]) - (cx[2] - cx[1])).abs() < 0.2, "{cx:?}");
    }

    #[test]
    fn linear_axis_empty_and_degenerate_input() {
        let svg = chart(false).render();
        assert_eq!(svg.matches("<polyline").count(), 2);
        let empty = Chart {
            series: vec![],
            ..chart(true)
        }
        .render();
        assert!(empty.contains("</svg>"));
        assert!(!empty.contains("NaN") && !empty.contains("inf"));
        let one = Chart {
            series: vec![Series {
                name: "x".into(),
                points: vec![(0.0, f64::NAN), (5.0, 0.0)],
                dashed: false,
                color: 7,
            }],
            ..chart(true)
        }
        .render();
        assert!(!one.contains("NaN"), "{one}");
        assert_eq!(one.matches("<circle").count(), 1);
    }
}
