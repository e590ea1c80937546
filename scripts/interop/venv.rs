//! The Python venv the interop tests run their independent implementations
//! in (`scripts/interop/requirements.txt`). Included by path from each test
//! crate that needs it, so that there is one copy.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `<target dir>/interop-venv` with the pinned requirements, made once and
/// remade whenever `requirements.txt` changes. `root` is the repository.
/// Tests call it at once from several threads and processes: a lock file
/// lets one make the venv while the others wait for it.
pub fn venv_python(root: &Path) -> PathBuf {
    // The test binary lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().unwrap();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| root.join(t))
        .unwrap_or_else(|| exe.ancestors().nth(3).unwrap().to_path_buf());
    std::fs::create_dir_all(&target).unwrap();
    let lock = std::fs::File::create(target.join("interop-venv.lock")).unwrap();
    lock.lock().expect("lock the interop venv");
    let venv = target.join("interop-venv");
    let python = venv.join("bin").join("python");
    let requirements = root.join("scripts/interop/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).unwrap();
    let marker = venv.join("confab-requirements.txt");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        run(
            Command::new("python3")
                .args(["-m", "venv", "--clear"])
                .arg(&venv),
            "creating the interop venv (needs python3 with venv)",
        );
        run(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(&requirements),
            "pip install -r scripts/interop/requirements.txt",
        );
        std::fs::write(&marker, wanted).unwrap();
    }
    python
}
