//! The plan: stages as a petgraph DAG, edges from producer to consumer.

use std::collections::{BTreeMap, BTreeSet};

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};

use super::Stage;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("stage `{stage}` depends on `{dependency}`, which is not in the plan")]
    MissingDependency { stage: String, dependency: String },
    #[error("two stages are named `{0}`")]
    Duplicate(String),
    #[error("the stages form a cycle through `{0}`")]
    Cycle(String),
    #[error("unknown target `{target}`; the plan has: {available}")]
    UnknownTarget { target: String, available: String },
}

pub struct Plan {
    graph: DiGraph<Box<dyn Stage>, ()>,
    by_name: BTreeMap<String, NodeIndex>,
    /// Stages in a topological order (ties by insertion order).
    order: Vec<NodeIndex>,
}

impl Plan {
    pub fn new(stages: Vec<Box<dyn Stage>>) -> Result<Self, PlanError> {
        let mut graph = DiGraph::new();
        let mut by_name = BTreeMap::new();
        for stage in stages {
            let name = stage.name().to_string();
            let index = graph.add_node(stage);
            if by_name.insert(name.clone(), index).is_some() {
                return Err(PlanError::Duplicate(name));
            }
        }
        let nodes: Vec<NodeIndex> = graph.node_indices().collect();
        for node in nodes {
            for dependency in graph[node].dependencies() {
                let Some(&from) = by_name.get(&dependency) else {
                    return Err(PlanError::MissingDependency {
                        stage: graph[node].name().to_string(),
                        dependency,
                    });
                };
                graph.add_edge(from, node, ());
            }
        }
        let order =
            stable_toposort(&graph).map_err(|n| PlanError::Cycle(graph[n].name().to_string()))?;
        Ok(Plan {
            graph,
            by_name,
            order,
        })
    }

    /// Keeps only the targets and what they need. A target is a stage name,
    /// or a suffix after the dot of stage names (`q4` selects `quantize.q4`
    /// and `verify.q4`).
    pub fn restrict(self, targets: &[String]) -> Result<Self, PlanError> {
        if targets.is_empty() {
            return Ok(self);
        }
        let mut keep = BTreeSet::new();
        for target in targets {
            let roots: Vec<NodeIndex> = self
                .resolve(target)?
                .iter()
                .map(|name| self.by_name[*name])
                .collect();
            for root in roots {
                let reversed = Reversed(&self.graph);
                let mut dfs = Dfs::new(reversed, root);
                while let Some(node) = dfs.next(reversed) {
                    keep.insert(node);
                }
            }
        }
        let Plan { mut graph, .. } = self;
        let mut stages = Vec::new();
        // Remove from the back so indices stay valid; rebuild in original order.
        for index in graph.node_indices().rev().collect::<Vec<_>>() {
            let stage = graph.remove_node(index).expect("index is valid");
            if keep.contains(&index) {
                stages.push(stage);
            }
        }
        stages.reverse();
        Plan::new(stages)
    }

    /// The stages a name on the command line means (`--target`, `--force`):
    /// the stage of that name, or every stage whose last part it is (`q4`:
    /// `quantize.q4` and `verify.q4`). Unknown: an error listing the plan.
    pub fn resolve(&self, target: &str) -> Result<Vec<&str>, PlanError> {
        let matches: Vec<&str> = self
            .names()
            .into_iter()
            .filter(|name| {
                *name == target || name.rsplit_once('.').is_some_and(|(_, s)| s == target)
            })
            .collect();
        if matches.is_empty() {
            let available = self
                .names()
                .into_iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(PlanError::UnknownTarget {
                target: target.to_string(),
                available,
            });
        }
        Ok(matches)
    }

    /// Stage names in execution order.
    pub fn names(&self) -> Vec<&str> {
        self.order.iter().map(|&i| self.graph[i].name()).collect()
    }

    pub fn stage(&self, name: &str) -> Option<&dyn Stage> {
        self.by_name.get(name).map(|&i| self.graph[i].as_ref())
    }

    pub fn stages(&self) -> impl Iterator<Item = &dyn Stage> {
        self.order.iter().map(|&i| self.graph[i].as_ref())
    }

    /// Direct dependents of a stage.
    pub fn dependents(&self, name: &str) -> Vec<&str> {
        let Some(&index) = self.by_name.get(name) else {
            return Vec::new();
        };
        let mut out: Vec<&str> = self
            .graph
            .neighbors(index)
            .map(|i| self.graph[i].name())
            .collect();
        out.sort();
        out
    }

    /// Stages with no dependents (the ends of the graph).
    pub fn leaves(&self) -> Vec<&str> {
        self.stages()
            .filter(|s| self.dependents(s.name()).is_empty())
            .map(|s| s.name())
            .collect()
    }

    /// The graph in Graphviz DOT.
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph symb {\n  rankdir=LR;\n  node [shape=box];\n");
        for stage in self.stages() {
            out.push_str(&format!("  \"{}\";\n", stage.name()));
        }
        for stage in self.stages() {
            for dependency in stage.dependencies() {
                out.push_str(&format!("  \"{dependency}\" -> \"{}\";\n", stage.name()));
            }
        }
        out.push_str("}\n");
        out
    }

    /// The graph as a Mermaid flowchart.
    pub fn to_mermaid(&self) -> String {
        let id = |name: &str| name.replace('.', "_");
        let mut out = String::from("flowchart LR\n");
        for stage in self.stages() {
            out.push_str(&format!("  {}[\"{}\"]\n", id(stage.name()), stage.name()));
        }
        for stage in self.stages() {
            for dependency in stage.dependencies() {
                out.push_str(&format!("  {} --> {}\n", id(&dependency), id(stage.name())));
            }
        }
        out
    }

    /// The graph as an indented tree from its roots, cargo-tree style.
    pub fn to_tree(&self) -> String {
        let mut out = String::new();
        let roots: Vec<&dyn Stage> = self
            .stages()
            .filter(|s| s.dependencies().is_empty())
            .collect();
        for root in roots {
            self.tree_node(root.name(), "", true, true, &mut out);
        }
        out
    }

    fn tree_node(&self, name: &str, prefix: &str, last: bool, top: bool, out: &mut String) {
        let stage = self.stage(name).expect("names come from the plan");
        let deps = stage.dependencies();
        let also = if deps.len() > 1 {
            format!(
                " (also needs {})",
                deps.iter()
                    .filter(|d| *d != name)
                    .map(|d| format!("`{d}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            String::new()
        };
        if top {
            out.push_str(&format!("{name}\n"));
        } else {
            out.push_str(&format!(
                "{prefix}{}{name}{also}\n",
                if last { "└── " } else { "├── " }
            ));
        }
        let children = self.dependents(name);
        let child_prefix = if top {
            String::new()
        } else {
            format!("{prefix}{}", if last { "    " } else { "│   " })
        };
        for (i, child) in children.iter().enumerate() {
            // A stage with several parents is drawn under its first one only.
            let child_stage = self.stage(child).expect("names come from the plan");
            let first_parent = child_stage
                .dependencies()
                .into_iter()
                .next()
                .unwrap_or_default();
            if first_parent != name {
                out.push_str(&format!(
                    "{child_prefix}{}{child} (drawn under `{first_parent}`)\n",
                    if i + 1 == children.len() {
                        "└── "
                    } else {
                        "├── "
                    }
                ));
                continue;
            }
            self.tree_node(child, &child_prefix, i + 1 == children.len(), false, out);
        }
    }
}

/// Kahn's algorithm, taking ready nodes in insertion order so that the
/// order (and every listing of stages) is stable. Errs with a node on a cycle.
fn stable_toposort<N>(graph: &DiGraph<N, ()>) -> Result<Vec<NodeIndex>, NodeIndex> {
    let mut waiting: Vec<usize> = graph
        .node_indices()
        .map(|n| graph.neighbors_directed(n, Direction::Incoming).count())
        .collect();
    let mut ready: BinaryHeap<Reverse<NodeIndex>> = graph
        .node_indices()
        .filter(|n| waiting[n.index()] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(graph.node_count());
    while let Some(Reverse(node)) = ready.pop() {
        order.push(node);
        for next in graph.neighbors_directed(node, Direction::Outgoing) {
            waiting[next.index()] -= 1;
            if waiting[next.index()] == 0 {
                ready.push(Reverse(next));
            }
        }
    }
    match graph.node_indices().find(|n| waiting[n.index()] > 0) {
        Some(on_cycle) => Err(on_cycle),
        None => Ok(order),
    }
}
