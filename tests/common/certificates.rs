//! A test CA and a server certificate it signed, made with the `openssl`
//! command (which `scripts/test` installs) in a directory of their own,
//! removed when dropped: for the probe's TLS checks and the list server.

use std::path::{Path, PathBuf};

/// The CA's certificate, and the server's certificate and key.
pub struct Certificates {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl Certificates {
    /// A CA, and a certificate it signed for `host` (a DNS name), in a
    /// directory named after `name` and this process.
    pub fn make(name: &str, host: &str) -> Certificates {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("certificates-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let output = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl is installed (scripts/test installs it)");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        openssl(
            &[
                &["req", "-x509", "-nodes", "-days", "1"][..],
                &p256,
                &["-subj", "/CN=matrix-gatekeeper test CA"],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                &["-keyout", "ca.key", "-out", "ca.pem"],
            ]
            .concat(),
        );
        let subject = format!("/CN={host}");
        openssl(
            &[
                &["req", "-new", "-nodes"][..],
                &p256,
                &[
                    "-subj",
                    &subject,
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                ],
            ]
            .concat(),
        );
        // Certificate verifiers read the name from subjectAltName only.
        std::fs::write(
            dir.join("server.ext"),
            format!(
                "subjectAltName=DNS:{host}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "2",
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
        Certificates {
            ca: dir.join("ca.pem"),
            certificate: dir.join("server.pem"),
            key: dir.join("server.key"),
            dir,
        }
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
