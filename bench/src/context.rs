//! What every section shares: where the servers and binaries are, the databases this run
//! created, where process logs go, and what a section hands back to the report.

use std::path::PathBuf;

use crate::pg::Databases;
use crate::procs::{Binaries, Services};

pub struct Ctx {
    pub services: Services,
    pub binaries: Binaries,
    pub dbs: Databases,
    pub logs: PathBuf,
    /// Unique to this harness run: part of every database name, queue prefix and Redis key.
    pub run_id: String,
}

impl Ctx {
    /// A queue and Redis key prefix no other run uses.
    pub fn prefix(&self, what: &str) -> String {
        format!("bfbench-{}-{what}", self.run_id)
    }

    /// Writes a spec file into the log directory and returns its path.
    pub fn write_spec(&self, name: &str, text: &str) -> anyhow::Result<String> {
        let path = self.logs.join(format!("{name}.toml"));
        std::fs::write(&path, text)?;
        Ok(path.to_string_lossy().into_owned())
    }
}

/// One figure with a target, for the summary at the top of the report.
#[derive(Debug, Clone)]
pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

/// A section of the report: its markdown body and the targets it measured.
#[derive(Debug, Clone, Default)]
pub struct Section {
    pub title: String,
    pub body: String,
    pub targets: Vec<Target>,
}

impl Section {
    pub fn new(title: &str) -> Section {
        Section {
            title: title.to_string(),
            ..Section::default()
        }
    }

    pub fn line(&mut self, text: impl AsRef<str>) {
        self.body.push_str(text.as_ref());
        self.body.push('\n');
    }

    pub fn target(&mut self, what: &str, target: &str, measured: String, met: bool) {
        self.targets.push(Target {
            what: what.to_string(),
            target: target.to_string(),
            measured,
            met,
        });
    }
}
