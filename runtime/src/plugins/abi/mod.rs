//! ABI versions: one module per `openlora:plugin` version the host loads, and the dispatch
//! from a component's exported interface version to the module that speaks it.
//!
//! Compatibility follows semver as the component model applies it: `0.1.x` plugins load
//! through [`v0_1`]; `0.2` (when it exists) is a new line with a module of its own; any other
//! version is refused with [`PluginError::UnsupportedAbi`]. Imports are checked against the
//! kind's grant before anything is linked, so a forbidden import is named precisely instead of
//! surfacing as a link error.

pub(crate) mod v0_1;

use super::config::PluginKind;
use super::error::PluginError;

const PACKAGE: &str = "openlora:plugin";

/// The ABI lines this host loads, for error messages.
pub const SUPPORTED: &str = "openlora:plugin@0.1.x";

/// An ABI line the host speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AbiLine {
    /// `0.1.x`.
    V0_1,
}

/// Splits `openlora:plugin/routing@0.1.0` into (`openlora:plugin/routing`, `0.1.0`).
fn split_version(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once('@') {
        Some((base, version)) => (base, Some(version)),
        None => (name, None),
    }
}

/// The semver-compatible line of `version`, if the host speaks it.
fn line_of(version: &str) -> Option<AbiLine> {
    let mut parts = version.split(['.', '-', '+']);
    let major = parts.next()?;
    let minor = parts.next()?;
    match (major, minor) {
        ("0", "1") => Some(AbiLine::V0_1),
        _ => None,
    }
}

/// Finds the kind's interface among a component's exports and returns its ABI line.
pub(crate) fn dispatch<'a>(kind: PluginKind, exports: impl Iterator<Item = &'a str>) -> Result<AbiLine, PluginError> {
    let wanted = format!("{PACKAGE}/{}", kind.interface());
    let mut seen = Vec::new();
    for name in exports {
        let (base, version) = split_version(name);
        if base == wanted {
            let version = version.unwrap_or("(none)");
            return line_of(version).ok_or_else(|| PluginError::UnsupportedAbi {
                version: version.to_owned(),
                supported: SUPPORTED.to_owned(),
            });
        }
        seen.push(name.to_owned());
    }
    Err(PluginError::WrongKind {
        kind,
        expected: kind.interface(),
        found: if seen.is_empty() { "nothing".to_owned() } else { seen.join(", ") },
    })
}

/// Checks every import against the kind's grant (same package, a granted interface, the same
/// ABI line).
pub(crate) fn check_imports<'a>(
    kind: PluginKind,
    line: AbiLine,
    imports: impl Iterator<Item = &'a str>,
) -> Result<(), PluginError> {
    for name in imports {
        let (base, version) = split_version(name);
        let granted = base
            .strip_prefix(PACKAGE)
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|interface| kind.granted_imports().contains(&interface))
            && version.and_then(line_of) == Some(line);
        if !granted {
            return Err(PluginError::ForbiddenImport { name: name.to_owned(), kind });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatches_by_interface_version() {
        let ok = dispatch(PluginKind::Router, ["openlora:plugin/routing@0.1.3"].into_iter());
        assert_eq!(ok, Ok(AbiLine::V0_1));
        let future = dispatch(PluginKind::Router, ["openlora:plugin/routing@9.0.0"].into_iter());
        assert!(matches!(future, Err(PluginError::UnsupportedAbi { version, .. }) if version == "9.0.0"));
        let next_minor = dispatch(PluginKind::Router, ["openlora:plugin/routing@0.2.0"].into_iter());
        assert!(matches!(next_minor, Err(PluginError::UnsupportedAbi { .. })));
        let wrong = dispatch(PluginKind::Router, ["openlora:plugin/merging@0.1.0"].into_iter());
        assert!(matches!(wrong, Err(PluginError::WrongKind { found, .. }) if found == "openlora:plugin/merging@0.1.0"));
    }

    #[test]
    fn imports_outside_the_grant_are_named() {
        let granted = ["openlora:plugin/logging@0.1.0", "openlora:plugin/types@0.1.0"];
        assert_eq!(check_imports(PluginKind::Preprocessor, AbiLine::V0_1, granted.into_iter()), Ok(()));
        for name in ["openlora:plugin/catalog@0.1.0", "wasi:random/random@0.2.0", "openlora:plugin/logging@0.2.0"] {
            let err = check_imports(PluginKind::Preprocessor, AbiLine::V0_1, [name].into_iter());
            assert!(matches!(err, Err(PluginError::ForbiddenImport { name: n, .. }) if n == name));
        }
    }
}
