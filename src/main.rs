use clap::Parser;

fn main() {
    symb::model::ops::configure_threads();
    let cli = symb::cli::Cli::parse();
    std::process::exit(symb::cli::run(cli).code());
}
