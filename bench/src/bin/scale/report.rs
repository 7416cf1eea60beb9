//! What a run prints and draws: the Markdown tables, the ratios to a
//! baseline run, the SVG chart of agent RSS against N.

use std::path::Path;

use anyhow::Context;

use crate::svg;
use crate::{Point, Results};

/// Prints the tables (and the ratios to `base`), writes the chart.
pub(crate) fn report(
    r: &Results,
    base: Option<&Results>,
    plot: Option<&Path>,
) -> anyhow::Result<()> {
    let mut text = tables(r);
    if let Some(base) = base {
        text.push_str(&ratios(r, base));
    }
    print!("{text}");
    if let Some(p) = plot {
        write(p, &chart(r, base).render())?;
        eprintln!("scale: chart in {}", p.display());
    }
    Ok(())
}

/// `x` with `d` decimals, or `-`.
fn f(x: Option<f64>, d: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.d$}"),
        _ => "-".into(),
    }
}

/// The Markdown tables of a run.
fn tables(r: &Results) -> String {
    let mut o = String::new();
    o.push_str(&format!(
        "{} real agents, {} fake pods per fake node, {} ({})\n\n",
        r.agents,
        r.pods_per_node,
        if r.points.iter().any(|p| p.peer_set.is_some()) {
            "a NetworkPolicy whose peer is every pod"
        } else {
            "no NetworkPolicy"
        },
        r.label
    ));
    if let Some(p0) = r.points.first().filter(|p| p.peer_set.is_some()) {
        o.push_str("| fake nodes | fake pods | peer set (pod addresses in one agent's table) | other agents' growth per remote pod (bytes) | pod started to its address in node2's peer set, p50 / p99 / max (ms, probes) |\n|---|---|---|---|---|\n");
        for p in &r.points {
            let per = (p.pods > 0).then(|| {
                (p.others_rss_mib_mean - p0.others_rss_mib_mean) * 1048576.0 / p.pods as f64
            });
            let mut l = p.peer_latency_ms.clone();
            l.sort_by(f64::total_cmp);
            let q = |x: f64| l[((l.len() as f64 - 1.0) * x).round() as usize];
            o.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                p.nodes,
                p.pods,
                p.peer_set.map_or("-".into(), |n| n.to_string()),
                f(per, 0),
                if l.is_empty() {
                    "-".to_string()
                } else {
                    format!(
                        "{:.0} / {:.0} / {:.0} ({})",
                        q(0.5),
                        q(0.99),
                        l[l.len() - 1],
                        l.len()
                    )
                }
            ));
        }
        o.push('\n');
    }
    o.push_str("| fake nodes | fake pods | leader RSS (MiB) | other agents RSS avg / max (MiB) | agent CPU at rest, leader / others (% of a core) | apiserver RSS (MiB) | etcd RSS (MiB) | load (s) | settled after (s) | agent restarts |\n");
    o.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for p in &r.points {
        o.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} | {} | {:.1} | {:.0}{} | {} |\n",
            p.nodes,
            p.pods,
            p.leader_rss_mib,
            p.others_rss_mib_mean,
            p.others_rss_mib_max,
            p.rest_cpu_leader_percent,
            p.rest_cpu_others_percent,
            f(p.apiserver_rss_mib, 0),
            f(p.etcd_rss_mib, 0),
            p.load_seconds,
            p.settle_seconds,
            if p.settled { "" } else { " (not settled)" },
            p.agent_restarts
        ));
    }
    o.push('\n');
    o.push_str("| fake nodes | Pod / Node watchers | Pod watch events per Pod change (load) | Node watch events per Node change (load) | watch events/s at rest (Pod / Node / all) | requests/s at rest per agent (est.) | churn: Pod changes (writes) | churn: Pod events per Pod change | churn: KiB sent per Pod change | agent CPU during churn, all (above rest) (% of a core) |\n");
    o.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for p in &r.points {
        let ev = |k: &str| p.rest_events_per_s.get(k).copied().unwrap_or(0.0);
        let all: f64 = p.rest_events_per_s.values().fold(0.0, |a, b| a + b);
        let c = p.churn.as_ref().filter(|c| c.changes > 0);
        o.push_str(&format!(
            "| {} | {:.0} / {:.0} | {} | {} | {:.2} / {:.2} / {:.2} | {:.3} | {} | {} | {} | {} |\n",
            p.nodes,
            p.pod_watchers,
            p.node_watchers,
            f(p.pod_events_per_change(), 2),
            f(p.node_events_per_change(), 2),
            ev("Pod"),
            ev("Node"),
            all,
            p.rest_requests_per_agent,
            c.map_or("-".into(), |c| format!("{} ({})", c.changes, c.writes)),
            f(c.map(|c| c.pod_events / c.changes as f64), 2),
            f(c.map(|c| c.pod_bytes / c.changes as f64 / 1024.0), 2),
            c.map_or("-".into(), |c| format!(
                "{:.1} ({:+.1})",
                c.agents_cpu_percent,
                c.agents_cpu_percent - p.rest_cpu_all_percent
            )),
        ));
    }
    if let Some(p) = r.points.last()
        && !p.rest_requests_by.is_empty()
    {
        o.push_str(&format!(
            "\nRequests/s at rest at {} fake nodes, all agents: {}\n",
            p.nodes,
            p.rest_requests_by
                .iter()
                .map(|(k, v)| format!("{k} {v:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    o
}

/// Ratios of this run to a baseline at the sizes both measured.
fn ratios(r: &Results, base: &Results) -> String {
    let mut o = format!(
        "\n| fake nodes | leader RSS {a} / {b} | others RSS {a} / {b} | Pod events per Pod change {a} / {b} | requests/s per agent {a} / {b} |\n|---|---|---|---|---|\n",
        a = r.label,
        b = base.label
    );
    let ratio = |x: f64, y: f64| {
        if y > 0.0 {
            format!("{:.2}x", x / y)
        } else {
            "-".into()
        }
    };
    for p in &r.points {
        let Some(q) = base.points.iter().find(|q| q.nodes == p.nodes) else {
            continue;
        };
        o.push_str(&format!(
            "| {} | {:.1} / {:.1} ({}) | {:.1} / {:.1} ({}) | {} / {} | {:.3} / {:.3} ({}) |\n",
            p.nodes,
            p.leader_rss_mib,
            q.leader_rss_mib,
            ratio(p.leader_rss_mib, q.leader_rss_mib),
            p.others_rss_mib_mean,
            q.others_rss_mib_mean,
            ratio(p.others_rss_mib_mean, q.others_rss_mib_mean),
            f(p.pod_events_per_change(), 2),
            f(q.pod_events_per_change(), 2),
            p.rest_requests_per_agent,
            q.rest_requests_per_agent,
            ratio(p.rest_requests_per_agent, q.rest_requests_per_agent),
        ));
    }
    o
}

/// The chart of agent RSS against N (fake nodes > 0; a log axis).
fn chart(r: &Results, base: Option<&Results>) -> svg::Chart {
    let mut series = Vec::new();
    let mut add = |res: &Results, dashed: bool| {
        let pts = |g: &dyn Fn(&Point) -> f64| -> Vec<(f64, f64)> {
            res.points
                .iter()
                .filter(|p| p.nodes > 0)
                .map(|p| (f64::from(p.nodes), g(p)))
                .collect()
        };
        series.push(svg::Series {
            name: format!("elected agent ({})", res.label),
            points: pts(&|p| p.leader_rss_mib),
            dashed,
            color: 0,
        });
        series.push(svg::Series {
            name: format!("other agents, mean ({})", res.label),
            points: pts(&|p| p.others_rss_mib_mean),
            dashed,
            color: 1,
        });
    };
    add(r, false);
    if let Some(b) = base {
        add(b, true);
    }
    svg::Chart {
        title: format!(
            "Agent RSS against cluster size ({} real agents, {} pods per fake node)",
            r.agents, r.pods_per_node
        ),
        x_label: "fake nodes (log scale)".into(),
        y_label: "RSS (MiB)".into(),
        log_x: true,
        series,
    }
}

/// Writes `text` to `path`, its directory made if need be.
pub(crate) fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Churn;

    fn point(nodes: u32, leader: f64, others: f64) -> Point {
        Point {
            nodes,
            pods: u64::from(nodes) * 30,
            leader_rss_mib: leader,
            others_rss_mib_mean: others,
            others_rss_mib_max: others + 1.0,
            load_pod_writes: 600,
            load_pod_changes: 600,
            load_pod_events: 3000.0,
            settled: true,
            rest_requests_per_agent: 0.1,
            churn: Some(Churn {
                rate: 10.0,
                seconds: 20.0,
                writes: 600,
                changes: 800,
                pod_events: 4000.0,
                pod_bytes: 800.0 * 5.0 * 2048.0,
                agents_cpu_percent: 12.0,
            }),
            ..Default::default()
        }
    }

    fn results(label: &str) -> Results {
        Results {
            label: label.into(),
            command: "scale".into(),
            agents: 3,
            pods_per_node: 30,
            points: vec![
                point(0, 22.0, 21.0),
                point(10, 23.0, 21.5),
                point(1000, 364.0, 94.0),
            ],
        }
    }

    #[test]
    fn tables_name_every_size_and_the_fan_out() {
        let t = tables(&results("old"));
        assert!(t.contains("| 1000 | 30000 | 364.0 | 94.0 / 95.0 |"), "{t}");
        // 3000 events for 600 writes; 10 KiB per write during churn.
        assert!(t.contains("| 1000 | 0 / 0 | 5.00 | - |"), "{t}");
        assert!(
            t.contains("| 800 (600) | 5.00 | 10.00 | 12.0 (+12.0) |"),
            "{t}"
        );
        let r = ratios(&results("new"), &results("old"));
        assert!(r.contains("| 1000 | 364.0 / 364.0 (1.00x) |"), "{r}");
    }

    #[test]
    fn the_chart_leaves_out_n_0_and_overlays_the_baseline() {
        let new = results("new");
        let old = results("old");
        let c = chart(&new, Some(&old));
        assert_eq!(c.series.len(), 4);
        assert!(c.series.iter().all(|s| s.points.len() == 2));
        assert!(c.series[2].dashed && !c.series[0].dashed);
        assert_eq!((c.series[0].color, c.series[2].color), (0, 0));
        assert!(c.series[2].name.contains("(old)"));
        let svg = c.render();
        assert_eq!(svg.matches("<circle").count(), 8);
    }

    #[test]
    fn results_round_trip_through_json() {
        let r = results("old");
        let back: Results = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.points.len(), 3);
        assert_eq!(back.points[2].leader_rss_mib, 364.0);
    }
}
