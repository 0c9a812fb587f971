//! The libvirt backend's stand-in in a build without the `libvirt` feature (the package ssh-on-demand-api, as
//! opposed to ssh-on-demand-api-libvirt): a configuration that names the backend is refused with the reason
//! when it is read, so no request ever reaches the methods below.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::{Lookup, Power};
use crate::error::Failure;

pub const ABSENT: &str = "this ssh-on-demand-api is built without the libvirt backend, which needs the libvirt \
                          library: install the package ssh-on-demand-api-libvirt instead (or build with \
                          --features libvirt)";

/// Whatever the section says: it is refused as a whole.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LibvirtConfig {
    #[serde(flatten)]
    settings: toml::Table,
}

impl LibvirtConfig {
    pub fn check(&self) -> Result<()> {
        bail!(ABSENT)
    }
}

pub struct Libvirt;

impl Libvirt {
    pub fn new(_config: LibvirtConfig) -> Libvirt {
        Libvirt
    }

    pub async fn power(&self, _vm: &str) -> Result<Power, Failure> {
        Err(absent())
    }

    pub async fn start(&self, _vm: &str) -> Result<(), Failure> {
        Err(absent())
    }

    pub async fn address(&self, _vm: &str) -> Result<Lookup, Failure> {
        Err(absent())
    }

    pub async fn shutdown(&self, _vm: &str) -> Result<(), Failure> {
        Err(absent())
    }

    pub async fn destroy(&self, _vm: &str) -> Result<(), Failure> {
        Err(absent())
    }

    pub async fn resume(&self, _vm: &str) -> Result<(), Failure> {
        Err(absent())
    }

    pub async fn boot_instead(&self, _vm: &str) -> Result<(), Failure> {
        Err(absent())
    }

    pub async fn managed_save(&self, _vm: &str) -> Result<(), Failure> {
        Err(absent())
    }
}

fn absent() -> Failure {
    Failure::refused(ABSENT.to_owned())
}
