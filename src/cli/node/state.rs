//! The node's state file: the highest applied revision, in decimal text.
//! It is replaced atomically and durably (a temporary file in the same
//! directory, fsync, rename over, fsync of the directory), so after any crash
//! it holds either the old revision or the new one.

use std::{
    ffi::OsString,
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
};

use super::super::client::{CliError, Exit, Result};

/// `changetoken-node-ID.state` in the working directory.
pub(super) fn default_state_file(id: &str) -> PathBuf {
    PathBuf::from(format!("changetoken-node-{id}.state"))
}

/// The applied revision in `path`: `None` if the file does not exist.
pub(super) fn read_state(path: &Path) -> Result<Option<u64>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(CliError {
                exit: Exit::Failure,
                message: format!("cannot read the state file {}: {err}", path.display()),
            });
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    text.trim().parse().map(Some).map_err(|_| {
        let shown: String = text.chars().take(40).collect();
        CliError {
            exit: Exit::Failure,
            message: format!(
                "corrupt state file {}: expected the applied revision in decimal, found {shown:?}",
                path.display()
            ),
        }
    })
}

/// Replaces `path` with `revision`, atomically and durably.
pub(super) fn write_state(path: &Path, revision: u64) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(".tmp");
    let temp = dir.join(temp_name);
    let mut file = File::create(&temp)?;
    file.write_all(format!("{revision}\n").as_bytes())?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_error(path: &Path) -> String {
        match read_state(path) {
            Ok(revision) => panic!("expected an error, read {revision:?}"),
            Err(err) => {
                assert_eq!(err.exit, Exit::Failure);
                err.message
            }
        }
    }

    fn state(path: &Path) -> Option<u64> {
        match read_state(path) {
            Ok(revision) => revision,
            Err(err) => panic!("{}", err.message),
        }
    }

    #[test]
    fn missing_state_file_is_a_new_node() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(state(&dir.path().join("n1.state")), None);
    }

    #[test]
    fn state_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1.state");
        for revision in [0, 1, 41, u64::MAX] {
            write_state(&path, revision).unwrap();
            assert_eq!(state(&path), Some(revision));
        }
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", u64::MAX)
        );
    }

    #[test]
    fn state_write_replaces_the_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1.state");
        fs::write(&path, "7\n").unwrap();
        // A temporary file left by a crash is overwritten, not appended to.
        fs::write(dir.path().join(".n1.state.tmp"), "garbage garbage garbage").unwrap();
        write_state(&path, 8).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("n1.state")]);
        assert_eq!(fs::read_to_string(&path).unwrap(), "8\n");
    }

    #[test]
    fn state_write_to_a_missing_directory_fails_and_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("n1.state");
        assert!(write_state(&path, 3).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn corrupt_state_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1.state");
        for content in ["", "\n", "12x\n", "-3\n", "1.5", "99999999999999999999999"] {
            fs::write(&path, content).unwrap();
            let message = state_error(&path);
            assert!(message.starts_with("corrupt state file "), "{message}");
            assert!(message.contains("n1.state"), "{message}");
            assert!(!message.contains('\n'), "{message}");
        }
    }

    #[test]
    fn unreadable_state_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let message = state_error(dir.path());
        assert!(
            message.starts_with("cannot read the state file "),
            "{message}"
        );
    }

    #[test]
    fn default_state_file_is_named_after_the_node() {
        assert_eq!(
            default_state_file("web-1"),
            PathBuf::from("changetoken-node-web-1.state")
        );
    }
}
