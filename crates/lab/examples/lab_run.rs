//! Developer runner for the lab's experiments without the CLI:
//! `cargo run -p capsule-lab --example lab_run -- mia|prada|kennen [quick] [OUTDIR]`.
//! The supported entry point is `mlcapsule lab`.

use std::time::Instant;

use capsule_lab::data::Dataset;
use capsule_lab::{kennen, mia, plot, prada_eval};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let what = args.get(1).map(String::as_str).unwrap_or("mia");
    let quick = args.iter().any(|a| a == "quick");
    let out = std::path::PathBuf::from(
        args.iter()
            .skip(2)
            .find(|a| *a != "quick")
            .cloned()
            .unwrap_or_else(|| "lab-out".into()),
    );
    std::fs::create_dir_all(&out)?;
    let dir = std::env::var("LAB_DATA")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../build/mnist").into());
    let data = Dataset::load(dir.as_ref())?;
    let t = Instant::now();
    match what {
        "mia" => {
            let cfg = if quick {
                mia::MiaConfig::quick()
            } else {
                mia::MiaConfig::full()
            };
            let r = mia::run(&data, &cfg)?;
            println!(
                "train acc {:.4} test acc {:.4} epochs {} H_in {:?} H_out {:?} saturated {}",
                r.train_accuracy,
                r.test_accuracy,
                r.epoch_loss.len(),
                r.member_entropy,
                r.non_member_entropy,
                r.saturated
            );
            for row in &r.rows {
                println!("{row:?}");
            }
            println!("{:?}", r.floors());
            plot::render(&r.panels(), &out.join("mia.png"))?;
            std::fs::write(out.join("mia.json"), serde_json::to_vec_pretty(&r)?)?;
        }
        "prada" => {
            let cfg = if quick {
                prada_eval::PradaConfig::quick()
            } else {
                prada_eval::PradaConfig::full()
            };
            let r = prada_eval::run(&data, &cfg)?;
            println!("acc {:.4} delta {:.2}", r.target_accuracy, r.delta);
            for s in r
                .calibration
                .iter()
                .chain(&r.benign)
                .chain([&r.jbda, &r.random])
            {
                println!(
                    "{} q={} minW={:.4} stored={} first={:?} alarms={}",
                    s.name,
                    s.queries,
                    s.min_w(),
                    s.stored,
                    s.first_alarm,
                    s.alarms
                );
            }
            println!("agreement {:.4} {:?}", r.substitute_agreement, r.floors());
            plot::render(&r.panels(), &out.join("prada.png"))?;
            std::fs::write(out.join("prada.json"), serde_json::to_vec_pretty(&r)?)?;
        }
        _ => {
            let cfg = if quick {
                kennen::KennenConfig::quick()
            } else {
                kennen::KennenConfig::full()
            };
            let o = kennen::run(&data, &cfg)?;
            let r = &o.report;
            println!("{r:#?}");
            println!("{:?}", r.floors());
            plot::render(&r.panels(), &out.join("kennen.png"))?;
        }
    }
    println!("{:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}
